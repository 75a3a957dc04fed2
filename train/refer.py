"""When a slice goes to a human: the refer rules shared by calibration, the model card and serving (torch-free).

Two rules, each fitted on the run's validation split and saved with the model:
- the top calibrated probability is under ``refer_threshold``;
- the two heads disagree: a tumour class with an empty mask, or ``no_tumor`` with a mask larger than
  ``disagree_min_area`` pixels at the model input (the mask head saw a tumour the classifier missed).
"""

from __future__ import annotations

import math

import numpy as np

from .naming import CLASSES, NO_TUMOR

# Share of correctly classified no_tumor validation slices the area rule may refer (its false-refer budget).
DISAGREE_FALSE_REFER = 0.01


def mask_area(mask_probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Tumour pixels at the model input: (N, S, S) probabilities -> (N,) counts; (S, S) -> a scalar count."""
    probs = np.asarray(mask_probs)
    return (probs >= threshold).sum(axis=(-2, -1))


def heads_disagree(labels: np.ndarray, areas: np.ndarray, min_area: float | None,
                   classes: tuple[str, ...] | list[str] = CLASSES) -> np.ndarray:
    """(N,) predicted class indices and model-input mask areas -> (N,) bool: a tumour class with an empty mask, or
    no_tumor with a mask above ``min_area``. ``min_area`` None (a model fitted before this rule) disables the second
    half only where it is unknown: then no_tumor never disagrees."""
    labels, areas = np.asarray(labels), np.asarray(areas)
    no_tumor = labels == list(classes).index(NO_TUMOR)
    tumour_without_mask = ~no_tumor & (areas == 0)
    mask_without_tumour = no_tumor & (areas > min_area) if min_area is not None else np.zeros_like(no_tumor)
    return tumour_without_mask | mask_without_tumour


def fit_disagree_min_area(labels: np.ndarray, y_true: np.ndarray, areas: np.ndarray,
                          false_refer: float = DISAGREE_FALSE_REFER, classes: tuple[str, ...] | list[str] = CLASSES) -> float:
    """The smallest area above which at most ``false_refer`` of the correctly classified no_tumor slices fall:
    the (1 - false_refer) quantile of their predicted mask areas (0 when none has a mask)."""
    k = list(classes).index(NO_TUMOR)
    healthy = (np.asarray(labels) == k) & (np.asarray(y_true) == k)
    values = np.sort(np.asarray(areas)[healthy].astype(float))
    if values.size == 0:
        return 0.0
    allowed = int(math.floor(false_refer * values.size))  # slices allowed above the cut
    return float(values[values.size - 1 - allowed])


def refer_policy_stats(y_true: np.ndarray, probs: np.ndarray, threshold: float | None, disagree: np.ndarray | None,
                       classes: tuple[str, ...] | list[str] = CLASSES) -> dict:
    """Refer rate, accepted accuracy and missed tumours among accepted slices for one policy (threshold and/or
    disagreement; ``None`` leaves a rule out)."""
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    pred = probs.argmax(1)
    refer = np.zeros(len(y_true), bool)
    if threshold is not None:
        refer |= probs.max(1) < threshold
    if disagree is not None:
        refer |= np.asarray(disagree, bool)
    accepted = ~refer
    k = list(classes).index(NO_TUMOR)
    missed = accepted & (y_true != k) & (pred == k)
    return {
        "refer_rate": float(refer.mean()) if len(refer) else math.nan,
        "n_referred": int(refer.sum()),
        "accepted_accuracy": float((pred == y_true)[accepted].mean()) if accepted.any() else math.nan,
        "n_accepted": int(accepted.sum()),
        "missed_tumours_accepted": int(missed.sum()),
        "missed_tumours_all": int(((y_true != k) & (pred == k)).sum()),
    }

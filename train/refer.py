"""When a slice goes to a human: the refer rules, once, for calibration, evaluation, the model card and serving
(torch-free).

Three rules, each fitted on the run's data and saved with the model (:class:`ReferRules`):
- the top calibrated probability is under ``threshold`` (:func:`low_confidence`);
- the two heads disagree: a tumour class with an empty mask, or ``no_tumor`` with a mask larger than
  ``disagree_min_area`` pixels at the model input (the mask head saw a tumour the classifier missed;
  :func:`heads_disagree`);
- the graph's learned ``ood_score`` is above ``ood_threshold`` (train/ood.py fits it; :func:`ood_flags`).

:func:`decide` applies all three to a batch of model outputs; serving calls it per answer and the card and
evaluation on the whole split, so the same outputs get the same decision everywhere. Thresholds are compared in
float32, the dtype of the model's outputs on the wire, so a value printed equal to a threshold is not "under" it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .naming import CLASSES, NO_TUMOR
from .preprocess import MASK_THRESHOLD

# Share of correctly classified no_tumor validation slices the area rule may refer (its false-refer budget).
DISAGREE_FALSE_REFER = 0.01
OOD_REASON = "out_of_distribution"  # the prefix of the learned OOD rule's reason


@dataclass(frozen=True)
class ReferRules:
    """A model's fitted refer parameters; ``None`` leaves a rule out (a model fitted before it existed)."""

    threshold: float | None = None
    disagree_min_area: float | None = None
    ood_threshold: float | None = None


@dataclass(frozen=True, eq=False)
class Decision:
    """Per-slice flags of :func:`decide`, each (N,) bool, and what they were computed from."""

    labels: np.ndarray  # predicted class index
    top: np.ndarray  # top probability
    areas: np.ndarray  # mask area at the model input
    ood_scores: np.ndarray | None
    low_confidence: np.ndarray
    disagree: np.ndarray  # reported always; refers only when the model has a fitted area
    ood: np.ndarray
    refer: np.ndarray


def mask_area(mask_probs: np.ndarray, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """Tumour pixels at the model input: (N, S, S) probabilities -> (N,) counts; (S, S) -> a scalar count."""
    probs = np.asarray(mask_probs)
    return (probs >= threshold).sum(axis=(-2, -1))


def low_confidence(top_probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """(N,) top probabilities -> (N,) bool: under the refer threshold (in float32); all False without one."""
    top = np.asarray(top_probs)
    if threshold is None:
        return np.zeros(top.shape, bool)
    return top.astype(np.float32) < np.float32(threshold)


def ood_flags(scores: np.ndarray, threshold: float | None) -> np.ndarray:
    """(N,) learned OOD scores -> (N,) bool: above the fitted threshold (in float32); all False without one.
    A non-finite score is a broken model output, refused."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    if threshold is None:
        return np.zeros(scores.shape, bool)
    if not np.isfinite(scores).all():
        raise ValueError(f"ood_score {scores[~np.isfinite(scores)][0]} is not finite; the model output is broken")
    return scores.astype(np.float32) > np.float32(threshold)


def heads_disagree(labels: np.ndarray, areas: np.ndarray, min_area: float | None,
                   classes: tuple[str, ...] | list[str] = CLASSES) -> np.ndarray:
    """(N,) predicted class indices and model-input mask areas -> (N,) bool: a tumour class with an empty mask, or
    no_tumor with a mask above ``min_area``. ``min_area`` None (a model fitted before this rule) disables the second
    half only where it is unknown: then no_tumor never disagrees."""
    labels, areas = np.asarray(labels), np.asarray(areas)
    # a model without a no_tumor class: every label is a tumour class
    no_tumor = labels == list(classes).index(NO_TUMOR) if NO_TUMOR in classes else np.zeros(labels.shape, bool)
    tumour_without_mask = ~no_tumor & (areas == 0)
    mask_without_tumour = no_tumor & (areas > min_area) if min_area is not None else np.zeros_like(no_tumor)
    return tumour_without_mask | mask_without_tumour


def decide(probs: np.ndarray, mask_probs: np.ndarray, ood_scores: np.ndarray | None, rules: ReferRules,
           classes: tuple[str, ...] | list[str] = CLASSES) -> Decision:
    """(N, C) calibrated probabilities, (N, S, S) mask probabilities and (N,) learned OOD scores (None: the model has
    none) -> every rule's flags and ``refer``: low confidence, or disagreement (only with a fitted area), or OOD."""
    probs = np.asarray(probs)
    labels, top = probs.argmax(1), probs.max(1)
    areas = np.asarray(mask_area(mask_probs)).reshape(-1)
    low = low_confidence(top, rules.threshold)
    disagree = heads_disagree(labels, areas, rules.disagree_min_area, classes)
    if ood_scores is not None:
        ood_scores = np.asarray(ood_scores, np.float64).reshape(-1)
    ood = (ood_flags(ood_scores, rules.ood_threshold) if ood_scores is not None and rules.ood_threshold is not None
           else np.zeros(len(labels), bool))
    refer = low | ood | (disagree if rules.disagree_min_area is not None else False)
    return Decision(labels, top, areas, ood_scores, low, disagree, ood, refer)


def reasons(decision: Decision, i: int, rules: ReferRules, classes: tuple[str, ...] | list[str] = CLASSES) -> list[str]:
    """One sentence per rule that refers slice ``i`` (empty: none does)."""
    out = []
    if decision.low_confidence[i]:
        out.append(f"max probability {decision.top[i]:.3f} is under the model's refer threshold {rules.threshold:.3f}")
    if rules.disagree_min_area is not None and decision.disagree[i]:
        out.append(f"mask and label disagree: {classes[decision.labels[i]]} with a predicted tumour mask of "
                   f"{int(decision.areas[i])} model-input pixels (the model refers no_tumor above "
                   f"{rules.disagree_min_area:g} and any tumour class at 0)")
    if decision.ood[i]:
        out.append(f"{OOD_REASON}: the image's feature distance to the training slices is {decision.ood_scores[i]:.1f}, "
                   f"above the model's out-of-distribution threshold {rules.ood_threshold:.1f}; it does not look like "
                   "the MRI slices the model was trained on")
    return out


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
    refer = low_confidence(probs.max(1), threshold)
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

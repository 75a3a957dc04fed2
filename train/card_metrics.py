"""The numbers of the model card, torch-free: every metric with a 95% percentile bootstrap CI, the explanation,
shortcut and refer checks (``card_metrics``); ``model_card`` renders them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from .metrics import (
    bootstrap_ci,
    classification_metrics,
    expected_calibration_error,
    pointing_game_hits,
    segmentation_metrics,
)
from .naming import CLASSES, NO_TUMOR
from .preprocess import MASK_THRESHOLD
from .refer import low_confidence, ood_flags, refer_policy_stats

CI_LEVEL = 0.95


# --------------------------------------------------------------------------- fast per-resample metrics
# bootstrap_ci calls these once per resample, so they are plain numpy (sklearn's input checks cost ~1 ms a call).
# Each equals its sklearn counterpart in classification_metrics, which gives the point estimates.


def _confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """sklearn's macro F1: mean over classes present in y or pred of 2TP / (support + predicted)."""
    cm = _confusion(y, pred, n_classes)
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    return float(np.mean(2 * np.diag(cm)[present] / (support + predicted)[present]))


def _recall(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    positives = y == k
    return float((pred[positives] == k).mean()) if positives.any() else math.nan


def _auc_ovr(y: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over classes with positives and negatives (Mann-Whitney U, ties averaged)."""
    aucs = []
    for k in range(probs.shape[1]):
        positives = y == k
        n_pos = int(positives.sum())
        n_neg = positives.size - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = stats.rankdata(probs[:, k])
        aucs.append((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs)) if aucs else math.nan


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def _estimate(value: float, ci: tuple[float, float], n: int) -> dict[str, Any]:
    return {"value": float(value), "ci": [float(ci[0]), float(ci[1])], "n": int(n)}


def _mean_estimate(values: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """Mean of per-slice values (0/1 hits, Dice, ...) with a bootstrap CI over those slices."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"value": math.nan, "ci": [math.nan, math.nan], "n": 0}
    return _estimate(values.mean(), bootstrap_ci(np.mean, values, n_boot=n_boot, seed=seed), values.size)


def select_true_class_cams(cams: np.ndarray, y_true: np.ndarray) -> np.ndarray:
    """(N, C, h, w) class activation maps -> (N, h, w) map of each slice's TRUE class, ReLU'd; (N, h, w) passes through."""
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim == 3:
        return np.maximum(cams, 0.0)
    if cams.ndim != 4 or cams.shape[0] != len(y_true):
        raise ValueError(f"cams must be (N, C, h, w) or (N, h, w) with N == {len(y_true)}; got {cams.shape}")
    return np.maximum(cams[np.arange(len(y_true)), np.asarray(y_true, dtype=np.int64)], 0.0)


# --------------------------------------------------------------------------- metrics


def card_metrics(
    y_true: np.ndarray, probs: np.ndarray, masks_true: np.ndarray, mask_probs: np.ndarray, cams: np.ndarray | None,
    non_square: np.ndarray, *, refer_threshold: float | None = None, n_boot: int = 1000, seed: int = 0,
    classes: Sequence[str] = CLASSES, mask_threshold: float = MASK_THRESHOLD, dilation_px: int = 8,
    seg_original: Mapping[str, np.ndarray] | None = None, disagree: np.ndarray | None = None,
    ood: np.ndarray | None = None,
) -> dict[str, Any]:
    """Every number of the model card, each as ``{"value", "ci": [low, high], "n"}`` with a 95% percentile bootstrap CI.

    Inputs are aligned per slice: labels (N,), calibrated probabilities (N, C) in ``classes`` order, binary truth
    masks and mask probabilities (N, H, W), class activation maps and a non-square flag (original image w != h).

    - Classification CIs resample all N slices; the same seed gives every metric the same resamples.
    - Dice/IoU are computed once per tumour slice (non-empty truth mask) and their mean is bootstrapped over those
      slices; ``empty_fp_rate`` likewise over empty-truth slices.
    - Pointing game: ``cams`` (N, C, h, w) -> the map of each slice's TRUE class, ReLU, bilinear upsampling to the
      mask size; a hit when its peak lies in the truth mask dilated by ``dilation_px``. ``cams`` (N, h, w) are taken
      as already selected for the true class. Scored on tumour slices only; ``None`` skips it.
    - Shortcut check: no_tumor recall on non-square vs square no_tumor slices, with counts, and their gap.
    - Refer (when ``refer_threshold`` is given): share of slices whose max probability is below it, and the accuracy
      of the accepted rest; with ``disagree`` (per-slice mask/label disagreement flags) the same for threshold +
      disagreement, and for both policies the tumours called no_tumor that were accepted; with ``ood`` (per-slice
      learned OOD flags) also for threshold + disagreement + OOD.
    - ``seg_original`` (per-slice ``dice_per_slice``/``iou_per_slice`` on the original images): Dice/IoU at the
      resolution users see, bootstrapped like the model-input ones.
    - Pointing game of the predicted mask's peak, as a reference for Grad-CAM's.
    """
    classes = tuple(classes)
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    probs = np.asarray(probs, dtype=np.float64)
    non_square = np.asarray(non_square, dtype=bool).ravel()
    n, n_classes = len(y_true), len(classes)
    if non_square.shape != y_true.shape:
        raise ValueError(f"non_square must have one flag per slice ({n}); got {non_square.shape}")
    boot = {"n_boot": n_boot, "seed": seed}
    idx = np.arange(n)
    pred = probs.argmax(1)

    point = classification_metrics(y_true, probs, classes)
    classification = {
        "accuracy": _estimate(point["accuracy"], bootstrap_ci(lambda i: np.mean(pred[i] == y_true[i]), idx, **boot), n),
        "macro_f1": _estimate(point["macro_f1"], bootstrap_ci(lambda i: _macro_f1(y_true[i], pred[i], n_classes), idx, **boot), n),
        "roc_auc_ovr": _estimate(point["roc_auc_ovr"], bootstrap_ci(lambda i: _auc_ovr(y_true[i], probs[i]), idx, **boot), n),
        "ece": _estimate(point["ece"], bootstrap_ci(lambda i: expected_calibration_error(probs[i], y_true[i]), idx, **boot), n),
        "per_class_recall": {
            name: _estimate(point["per_class"][name]["recall"] if point["per_class"][name]["support"] else math.nan,
                            bootstrap_ci(lambda i, k=k: _recall(y_true[i], pred[i], k), idx, **boot),
                            point["per_class"][name]["support"])
            for k, name in enumerate(classes)
        },
        "confusion_matrix": point["confusion_matrix"],
    }

    seg = segmentation_metrics(masks_true, mask_probs, mask_threshold)
    tumour = ~np.isnan(seg["dice_per_slice"])
    empty_fp = (np.asarray(mask_probs)[~tumour] >= mask_threshold).any(axis=(1, 2))
    segmentation = {
        "threshold": float(mask_threshold),
        "n_tumour_slices": int(tumour.sum()),
        "dice": _mean_estimate(seg["dice_per_slice"][tumour], **boot),
        "iou": _mean_estimate(seg["iou_per_slice"][tumour], **boot),
        "empty_fp_rate": _mean_estimate(empty_fp, **boot),
    }
    if seg_original is not None:
        d, j = (np.asarray(seg_original[k]) for k in ("dice_per_slice", "iou_per_slice"))
        segmentation["dice_original"] = _mean_estimate(d[~np.isnan(d)], **boot)
        segmentation["iou_original"] = _mean_estimate(j[~np.isnan(j)], **boot)

    pointing = None
    if cams is not None:
        hits = pointing_game_hits(select_true_class_cams(cams, y_true), masks_true, dilation_px)
        pointing = {**_mean_estimate(hits[~np.isnan(hits)], **boot), "dilation_px": int(dilation_px),
                    "cam_class": "true class", "mask_size": list(np.asarray(masks_true).shape[1:]),
                    "cam_size": list(np.asarray(cams).shape[-2:])}
        peak = pointing_game_hits(np.asarray(mask_probs, np.float32), masks_true, dilation_px)
        pointing["mask_peak"] = _mean_estimate(peak[~np.isnan(peak)], **boot)

    no_tumor = y_true == classes.index(NO_TUMOR) if NO_TUMOR in classes else np.zeros(n, bool)
    recalled = pred == y_true

    def group(flag: np.ndarray) -> dict[str, Any]:
        hits = recalled[no_tumor & flag]
        return {**_mean_estimate(hits, **boot), "n_recalled": int(hits.sum())}

    nt_idx = np.flatnonzero(no_tumor)

    def gap(i: np.ndarray) -> float:
        ns = non_square[i]
        if ns.all() or not ns.any():
            return math.nan
        return float(recalled[i][~ns].mean() - recalled[i][ns].mean())

    shortcut = {
        "non_square": group(non_square),
        "square": group(~non_square),
        # square minus non-square recall: near 0 when squareness carries no signal the model uses
        "gap": {"value": gap(nt_idx), "ci": list(bootstrap_ci(gap, nt_idx, **boot)), "n": int(nt_idx.size)},
        "non_square_by_class": {name: int(non_square[y_true == k].sum()) for k, name in enumerate(classes)},
        "n_by_class": {name: int((y_true == k).sum()) for k, name in enumerate(classes)},
    }

    refer = None
    if refer_threshold is not None:
        accepted = ~low_confidence(probs.max(1), refer_threshold)

        def accepted_accuracy(i: np.ndarray) -> float:
            a = accepted[i]
            return float(recalled[i][a].mean()) if a.any() else math.nan

        refer = {
            "threshold": float(refer_threshold),
            "refer_rate": _mean_estimate(~accepted, **boot),
            "accepted_accuracy": {"value": accepted_accuracy(idx),
                                  "ci": list(bootstrap_ci(accepted_accuracy, idx, **boot)), "n": int(accepted.sum())},
            "n_referred": int((~accepted).sum()),
        }
        k_nt = classes.index(NO_TUMOR) if NO_TUMOR in classes else -1
        policies = {"threshold": None} if disagree is None else {"threshold": None, "threshold+disagreement": disagree}
        if ood is not None:
            ood = np.asarray(ood, bool)
            policies["threshold+disagreement+ood" if disagree is not None else "threshold+ood"] = (
                ood | np.asarray(disagree, bool) if disagree is not None else ood)
        refer["policies"] = {}
        for name, flags in policies.items():
            stats = refer_policy_stats(y_true, probs, refer_threshold, flags, classes)
            refer["policies"][name] = stats
        refer["missed_tumours"] = int(((y_true != k_nt) & (pred == k_nt)).sum())

    return {
        "n": n, "classes": list(classes), "ci_level": CI_LEVEL, "n_boot": n_boot, "seed": seed,
        "classification": classification, "segmentation": segmentation, "pointing_game": pointing,
        "shortcut": shortcut, "refer": refer,
    }


def ood_metrics(val_scores: np.ndarray, probe_scores: Mapping[str, float], threshold: float,
                kinds: Mapping[str, str], *, n_boot: int = 1000, seed: int = 0,
                fit: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The learned OOD check: false-refer rate on the validation slices (a score above ``threshold``, with a bootstrap
    CI) and the detection rate on the probe set (``probe_scores`` by name, ``kinds`` name -> family), overall and by
    family. ``fit``: the fit's summary (train/ood.py), carried through."""
    val = np.asarray(val_scores, np.float64)
    referred = ood_flags(val, threshold)
    names = list(probe_scores)
    detected = ood_flags(np.array([probe_scores[n] for n in names], np.float64), threshold)
    by_kind: dict[str, dict[str, int]] = {}
    for name, hit in zip(names, detected):
        entry = by_kind.setdefault(kinds[name], {"n": 0, "detected": 0})
        entry["n"] += 1
        entry["detected"] += int(hit)
    return {
        "threshold": float(threshold),
        "val_false_refer_rate": _mean_estimate(referred, n_boot, seed),
        "n_val_referred": int(referred.sum()),
        "val_score_quantiles": {q: float(np.quantile(val, float(q))) for q in ("0.5", "0.99")} | {"max": float(val.max())},
        "probe_detection_rate": {"value": float(detected.mean()), "n": len(names), "n_detected": int(detected.sum())},
        "probe_by_kind": by_kind,
        "probes": {n: {"score": float(probe_scores[n]), "kind": kinds[n], "detected": bool(hit)}
                   for n, hit in zip(names, detected)},
        "min_probe_score": float(min(probe_scores.values())),
        "fit": dict(fit or {}),
    }

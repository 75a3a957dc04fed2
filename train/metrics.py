"""Evaluation metrics for the classifier, the segmenter and the explainer, torch-free (numpy/scipy/sklearn).

Shared by PyTorch evaluation and by evaluation of an exported ONNX model, so inputs are plain arrays:
class probabilities (N, C) in ``CLASSES`` order, integer labels (N,), masks and probability maps (N, H, W).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, optimize, special
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from .naming import CLASSES
from .preprocess import MASK_THRESHOLD

DEFAULT_THRESHOLDS = np.linspace(0.05, 0.95, 19)


# --------------------------------------------------------------------------- classification


def _check_probs(y_true: np.ndarray, probs: np.ndarray, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != y_true.shape[0]:
        raise ValueError(f"probs must be (N, C) with N == len(y_true); got probs {probs.shape}, y_true {y_true.shape}")
    if n_classes is not None and probs.shape[1] != n_classes:
        raise ValueError(f"probs has {probs.shape[1]} columns but {n_classes} class names were given")
    if y_true.size and (y_true.min() < 0 or y_true.max() >= probs.shape[1]):
        raise ValueError(f"y_true must hold class indices in [0, {probs.shape[1]}); got range [{y_true.min()}, {y_true.max()}]")
    return y_true, probs


def _renormalised(probs: np.ndarray) -> np.ndarray:
    return probs / probs.sum(axis=1, keepdims=True)


def roc_auc_one_vs_rest(y_true: np.ndarray, probs: np.ndarray) -> tuple[float, list[float | None]]:
    """Macro one-vs-rest ROC AUC over the classes that have both positives and negatives in ``y_true``.

    Returns (macro, per_class) where per_class[k] is None for a class AUC is undefined for. sklearn's
    ``roc_auc_score(multi_class="ovr")`` returns NaN for the whole score as soon as one class is missing
    from ``y_true`` (common on small or filtered test sets), hence the per-class loop.
    """
    y_true, probs = _check_probs(y_true, probs)
    per_class: list[float | None] = []
    for k in range(probs.shape[1]):
        positives = y_true == k
        if positives.all() or not positives.any():
            per_class.append(None)
        else:
            per_class.append(float(roc_auc_score(positives, probs[:, k])))
    defined = [a for a in per_class if a is not None]
    return (float(np.mean(defined)) if defined else math.nan), per_class


def multiclass_brier(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean over samples of sum_k (p_k - onehot_k)^2, range [0, 2].

    Equals sklearn>=1.7 ``brier_score_loss`` on multiclass input; hand-written because the project allows
    sklearn 1.4, whose Brier score is binary only.
    """
    y_true, probs = _check_probs(y_true, probs)
    onehot = np.eye(probs.shape[1])[y_true]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def reliability_curve(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Top-label reliability: per equal-width confidence bin, mean confidence, accuracy and count.

    Confidence is the max probability; bin m holds confidences in ((m-1)/M, m/M], the first bin also holds 0.
    Empty bins have NaN confidence and accuracy. sklearn's ``calibration_curve`` is binary only.
    """
    y_true, probs = _check_probs(y_true, probs)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right-closed bins: index m-1 for conf in ((m-1)/M, m/M]; conf == 0 goes to the first bin
    idx = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return {"bin_edges": edges, "confidence": mean_conf, "accuracy": accuracy, "count": count}


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over bins of |B|/N * |accuracy(B) - confidence(B)|, equal-width bins on max prob."""
    curve = reliability_curve(probs, y_true, n_bins)
    count = curve["count"]
    total = count.sum()
    if total == 0:
        return math.nan
    filled = count > 0
    gaps = np.abs(curve["accuracy"][filled] - curve["confidence"][filled])
    return float(np.sum(count[filled] / total * gaps))


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES, n_bins: int = 15
) -> dict[str, Any]:
    """Headline classification metrics from integer labels and (N, C) probabilities in ``classes`` order.

    - ``macro_f1`` averages over classes present in y_true or predictions (sklearn's default label set), so a
      class absent from both does not count as F1 = 0; ``per_class`` always lists every class.
    - ``roc_auc_ovr`` is the macro one-vs-rest AUC over classes present in y_true (``roc_auc_classes`` names
      them); NaN when none qualify, which ``to_jsonable`` turns into null.
    - ``ece`` uses ``n_bins`` equal-width bins on max probability; ``nll`` is the mean natural-log loss;
      ``brier`` is the multiclass Brier score (sum over classes, range [0, 2]).
    """
    classes = tuple(classes)
    y_true, probs = _check_probs(y_true, probs, len(classes))
    labels = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    auc, auc_per_class = roc_auc_one_vs_rest(y_true, probs)
    return {
        "n": int(y_true.size),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "roc_auc_ovr": auc,
        "roc_auc_classes": [c for c, a in zip(classes, auc_per_class) if a is not None],
        "ece": expected_calibration_error(probs, y_true, n_bins),
        # float32 softmax (ONNX Runtime) sums to 1 only within ~1e-7: renormalise for log_loss's own check.
        "nll": float(log_loss(y_true, _renormalised(np.clip(probs, 1e-15, 1.0)), labels=labels)),
        "brier": multiclass_brier(y_true, probs),
        "per_class": {
            name: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
                "roc_auc": auc_per_class[k],
            }
            for k, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


# --------------------------------------------------------------------------- calibration


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature."""
    return special.softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def _nll_at(logits: np.ndarray, y_true: np.ndarray, temperature: float) -> float:
    log_p = special.log_softmax(logits / temperature, axis=1)
    return float(-np.mean(log_p[np.arange(y_true.size), y_true]))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al. 2017).

    Fit on a validation split, never on the test split it is then evaluated on. Searches log T, where the NLL
    is smooth and well scaled, with a bounded scalar minimiser.
    """
    y_true, logits = _check_probs(y_true, logits)
    res = optimize.minimize_scalar(
        lambda log_t: _nll_at(logits, y_true, math.exp(log_t)),
        bounds=(math.log(bounds[0]), math.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(res.x))


# --------------------------------------------------------------------------- segmentation


def _masks(masks_true: np.ndarray, mask_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    truth = np.asarray(masks_true) != 0
    probs = np.asarray(mask_probs)
    if truth.ndim == 2:
        truth, probs = truth[None], probs[None]
    if truth.shape != probs.shape or truth.ndim != 3:
        raise ValueError(f"masks_true and mask_probs must both be (N, H, W); got {truth.shape} and {probs.shape}")
    return truth, probs


def dice_iou(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice Dice and IoU; NaN where the ground truth is empty (the slice is not scored)."""
    inter = np.logical_and(truth, pred).sum(axis=(1, 2), dtype=np.int64)
    t = truth.sum(axis=(1, 2), dtype=np.int64)
    p = pred.sum(axis=(1, 2), dtype=np.int64)
    scored = t > 0
    dice = np.full(truth.shape[0], np.nan)
    iou = np.full(truth.shape[0], np.nan)
    # t > 0 keeps both denominators positive on scored slices
    dice[scored] = 2.0 * inter[scored] / (t[scored] + p[scored])
    iou[scored] = inter[scored] / (t[scored] + p[scored] - inter[scored])
    return dice, iou


def segmentation_metrics(masks_true: np.ndarray, mask_probs: np.ndarray, threshold: float = MASK_THRESHOLD) -> dict[str, Any]:
    """Dice and IoU of ``mask_probs >= threshold`` against binary ground truth (non-zero = tumour).

    ``dice`` and ``iou`` are means over slices with a non-empty ground truth only. Dice with both masks empty
    (0/0) is therefore never needed; such slices (no_tumor) get NaN in ``dice_per_slice``/``iou_per_slice``
    (length N, aligned with the input) and are summarised instead by ``empty_fp_rate``: the share of
    empty-truth slices where any pixel is predicted as tumour. Binarise soft masks (e.g. 0..255 ramps) first.
    """
    truth, probs = _masks(masks_true, mask_probs)
    pred = probs >= threshold
    dice, iou = dice_iou(truth, pred)
    scored = ~np.isnan(dice)
    empty = ~scored
    return {
        "threshold": float(threshold),
        "n_tumour_slices": int(scored.sum()),
        "dice": float(dice[scored].mean()) if scored.any() else math.nan,
        "iou": float(iou[scored].mean()) if scored.any() else math.nan,
        "empty_fp_rate": float(pred[empty].any(axis=(1, 2)).mean()) if empty.any() else math.nan,
        "dice_per_slice": dice,
        "iou_per_slice": iou,
    }


def dice_iou_vs_threshold(
    masks_true: np.ndarray, mask_probs: np.ndarray, thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS
) -> dict[str, np.ndarray]:
    """Mean Dice and IoU over tumour slices at each threshold; ``{"thresholds", "dice", "iou"}`` arrays."""
    truth, probs = _masks(masks_true, mask_probs)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    scored = truth.any(axis=(1, 2))
    truth, probs = truth[scored], probs[scored]
    dice = np.full(thresholds.size, np.nan)
    iou = np.full(thresholds.size, np.nan)
    if scored.any():
        for i, t in enumerate(thresholds):
            d, j = dice_iou(truth, probs >= t)
            dice[i], iou[i] = d.mean(), j.mean()
    return {"thresholds": thresholds, "dice": dice, "iou": iou}


# --------------------------------------------------------------------------- explanation


def pointing_game_hits(cams: np.ndarray, masks_true: np.ndarray, dilation_px: int = 8) -> np.ndarray:
    """Per slice: 1.0 if the CAM's peak lies inside the true mask dilated by ``dilation_px`` pixels, else 0.0.

    CAMs of shape (N, h, w) are bilinearly resized to the mask size (N, H, W) before taking the peak (first
    maximum in row-major order). Slices with an empty true mask are NaN (nothing to point at). The tolerance
    follows Zhang et al. 2016, who allow 15 px on ~224 px images; CAMs are coarse, so an exact hit is too strict.
    """
    cams = np.asarray(cams, dtype=np.float32)
    truth = np.asarray(masks_true) != 0
    if cams.ndim != 3 or truth.ndim != 3 or cams.shape[0] != truth.shape[0]:
        raise ValueError(f"cams must be (N, h, w) and masks_true (N, H, W) with the same N; got {cams.shape}, {truth.shape}")
    size = truth.shape[1:]
    hits = np.full(truth.shape[0], np.nan)
    for i, (cam, mask) in enumerate(zip(cams, truth)):
        if not mask.any():
            continue
        if cam.shape != size:
            cam = ndimage.zoom(cam, (size[0] / cam.shape[0], size[1] / cam.shape[1]), order=1, grid_mode=True, mode="nearest")
        peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
        hits[i] = float(dilate_mask(mask, dilation_px)[peak])
    return hits


def dilate_mask(mask: np.ndarray, dilation_px: int) -> np.ndarray:
    """(H, W) bool mask grown by ``dilation_px`` pixels (4-connected steps): the pointing game's tolerance."""
    if dilation_px <= 0:
        return mask
    return ndimage.binary_dilation(mask, ndimage.generate_binary_structure(2, 1), iterations=dilation_px)


def energy_in_mask(heatmaps: np.ndarray, masks_true: np.ndarray, dilation_px: int = 8) -> np.ndarray:
    """Per slice: the share of the heatmap's positive mass inside the true mask dilated by ``dilation_px`` (the
    pointing game's tolerance). ``heatmaps`` (N, H, W) at the mask size. NaN for an empty true mask; 0 for a heatmap
    with no positive mass (it points nowhere)."""
    heat = np.maximum(np.asarray(heatmaps, dtype=np.float64), 0)
    truth = np.asarray(masks_true) != 0
    if heat.shape != truth.shape or heat.ndim != 3:
        raise ValueError(f"heatmaps and masks_true must both be (N, H, W); got {heat.shape}, {truth.shape}")
    share = np.full(truth.shape[0], np.nan)
    for i, (h, mask) in enumerate(zip(heat, truth)):
        if mask.any():
            total = h.sum()
            share[i] = float(h[dilate_mask(mask, dilation_px)].sum() / total) if total > 0 else 0.0
    return share


def pointing_game(cams: np.ndarray, masks_true: np.ndarray, dilation_px: int = 8) -> float:
    """Share of tumour slices whose CAM peak falls inside the dilated true mask (see ``pointing_game_hits``)."""
    hits = pointing_game_hits(cams, masks_true, dilation_px)
    scored = ~np.isnan(hits)
    return float(hits[scored].mean()) if scored.any() else math.nan


# --------------------------------------------------------------------------- uncertainty and serialisation


def bootstrap_ci(
    metric_fn: Callable[..., float], *arrays: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of ``metric_fn(*arrays)``, resampling rows of all arrays together.

    Resamples where the metric is undefined (NaN, or it raises ValueError, e.g. one class only) are dropped.
    Deterministic for a given seed.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array to resample")
    arrays = tuple(np.asarray(a) for a in arrays)
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError(f"all arrays must share their first dimension; got {[a.shape[0] for a in arrays]}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        try:
            value = float(metric_fn(*(a[idx] for a in arrays)))
        except ValueError:
            continue
        if not math.isnan(value):
            values.append(value)
    if not values:
        return math.nan, math.nan
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def to_jsonable(obj: Any) -> Any:
    """Recursively convert numpy scalars/arrays, tuples and paths to JSON types; NaN and ±inf become None."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj

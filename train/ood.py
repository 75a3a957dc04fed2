"""The learned out-of-distribution score: Mahalanobis distance of the class head's pooled feature to class-conditional
Gaussians with one shared, Ledoit-Wolf-shrunk covariance (Lee et al. 2018), fitted on the run's training slices only.

``score(f) = min_c (f - mu_c)^T P (f - mu_c)`` with ``P = W W^T``; the exported full graph computes the same number
(``export/wrappers.OodScore``) from ``means`` and ``whitening`` stored in the checkpoint. The threshold is a high
quantile of the training slices' *out-of-fold* scores (each slice scored by Gaussians fitted without it: in-sample
scores run low, measured on v2 in ARCHITECTURE.md); the validation split is only used to *measure* the false-refer
rate.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .naming import CLASSES
from .refer import ood_flags

OOD_FALSE_REFER = 0.01  # validation slices the OOD rule may refer (its false-refer budget)
# Quantile of the out-of-fold training scores used as the threshold: 0.5% of unseen in-distribution slices expected
# above it, half the budget, for the shift between the training portion and new slices.
OOD_QUANTILE = 0.995
OOD_FOLDS = 5
FEATURES_FILE = "ood_features.npz"  # per-run cache of pooled features (train and val portions)


@dataclass(frozen=True)
class OodModel:
    """The fitted score: class means (C, K), whitening W (K, K) with ``P = W W^T``, and the refer threshold."""

    means: np.ndarray
    whitening: np.ndarray
    threshold: float
    quantile: float = OOD_QUANTILE
    shrinkage: float = 0.0

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N, K) -> (N,) float64 ``min_c ||(f - mu_c) W||^2``, the graph's formula."""
        diff = np.asarray(features, np.float64)[:, None, :] - self.means[None]
        return (np.einsum("nck,kj->ncj", diff, self.whitening) ** 2).sum(-1).min(1)

    def to_state(self) -> dict:
        """What the checkpoint keeps (``state["ood"]``): float32 arrays as the graph uses them, plus the numbers."""
        return {"means": self.means.astype(np.float32), "whitening": self.whitening.astype(np.float32),
                "threshold": float(self.threshold), "quantile": float(self.quantile),
                "shrinkage": float(self.shrinkage)}

    @classmethod
    def from_state(cls, state: dict) -> OodModel:
        return cls(np.asarray(state["means"], np.float64), np.asarray(state["whitening"], np.float64),
                   float(state["threshold"]), float(state.get("quantile", OOD_QUANTILE)),
                   float(state.get("shrinkage", 0.0)))


def mahalanobis(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Reference formula: (N,) ``min_c (f - mu_c)^T P (f - mu_c)``."""
    diff = np.asarray(features, np.float64)[:, None, :] - np.asarray(means, np.float64)[None]
    return np.einsum("nck,kj,ncj->nc", diff, precision, diff).min(1)


def fit_gaussians(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Class means and the shared precision of the class-centred features (scikit-learn ``LedoitWolf``).

    Returns ``(means (C, K), precision (K, K), shrinkage)``. Every class needs at least two slices.
    """
    from sklearn.covariance import LedoitWolf

    features = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes)
    if (counts < 2).any():
        raise ValueError(f"every class needs >= 2 slices to fit the OOD Gaussians; counts per class {counts.tolist()}")
    means = np.stack([features[labels == c].mean(0) for c in range(num_classes)])
    lw = LedoitWolf(assume_centered=True).fit(features - means[labels])
    return means, lw.precision_, float(lw.shrinkage_)


def whitening_of(precision: np.ndarray) -> np.ndarray:
    """W with ``W W^T = P`` (Cholesky), so the graph computes a sum of squares, never negative."""
    return np.linalg.cholesky((precision + precision.T) / 2)


def out_of_fold_scores(features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int = OOD_FOLDS,
                       seed: int = 0) -> np.ndarray:
    """(N,) each slice's score under Gaussians fitted on the other ``folds - 1`` folds: folds stratified by class
    (random, seeded), and no more folds than the smallest class has slices."""
    features, labels = np.asarray(features, np.float64), np.asarray(labels)
    folds = min(folds, int(np.bincount(labels, minlength=num_classes).min()))
    if folds < 2:
        raise ValueError(f"out-of-fold scores need >= 2 slices of every class; counts {np.bincount(labels).tolist()}")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), np.int64)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        fold[rng.permutation(members)] = np.arange(len(members)) % folds
    scores = np.empty(len(labels))
    for k in range(folds):
        means, precision, _ = fit_gaussians(features[fold != k], labels[fold != k], num_classes)
        scores[fold == k] = mahalanobis(features[fold == k], means, precision)
    return scores


def fit_ood(features: np.ndarray, labels: np.ndarray, num_classes: int, quantile: float = OOD_QUANTILE,
            folds: int = OOD_FOLDS, seed: int = 0) -> OodModel:
    """Gaussians fitted on all the training features; threshold = ``quantile`` of their out-of-fold scores
    (``folds`` < 2: of their in-sample scores, which run low)."""
    if not 0.5 <= quantile <= 1.0:
        raise ValueError(f"quantile {quantile} must be in [0.5, 1]")
    means, precision, shrinkage = fit_gaussians(features, labels, num_classes)
    fitted = OodModel(means, whitening_of(precision), 0.0, quantile, shrinkage)
    scores = (out_of_fold_scores(features, labels, num_classes, folds, seed) if folds >= 2
              else fitted.score(features))
    return OodModel(means, fitted.whitening, float(np.quantile(scores, quantile)), quantile, shrinkage)


def refer_rate(scores: np.ndarray, threshold: float) -> float:
    """Share of scores above the threshold (what serving refers: ``score > threshold``)."""
    scores = np.asarray(scores)
    return float(ood_flags(scores, threshold).mean()) if scores.size else float("nan")


# -- the run: features of the training and validation portions, the fit, the checkpoint ---------------------------

def _model_hash(state: dict) -> str:
    """Hash of the weights (not of the file: calibration rewrites the checkpoint without changing them)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state["model"].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def run_features(checkpoint: str | Path, data: str | Path, *, progress: bool = True,
                 batch_size: int = 64) -> dict[str, np.ndarray]:
    """Pooled features and labels of the run's training portion (train split minus the validation keys) and of the
    validation split, cached in ``RUN/ood_features.npz`` keyed by the weights' hash (extraction takes minutes on CPU)."""
    from .cache import decode_samples
    from .predict import predict_arrays
    from .preprocess import PreprocessConfig
    from .samples import build_index
    from .splits import checkpoint_val_keys
    from .trainer.checkpoint import load_model

    checkpoint = Path(checkpoint)
    model, state = load_model(checkpoint)
    key = _model_hash(state)
    cache = checkpoint.parent / FEATURES_FILE
    if cache.exists():
        stored = dict(np.load(cache, allow_pickle=False))
        if str(stored.get("model_hash")) == key:
            return stored
    preprocess = PreprocessConfig.from_dict(state["preprocess"])
    val_keys = checkpoint_val_keys(checkpoint, state)
    samples = build_index(data).split("train")
    portions = {"train": [s for s in samples if s.key not in val_keys], "val": [s for s in samples if s.key in val_keys]}
    if len(portions["val"]) != len(val_keys):
        raise ValueError(f"{data}: only {len(portions['val'])} of the run's {len(val_keys)} validation slices found; "
                         "pass the dataset the run was trained on")
    out: dict[str, np.ndarray] = {"model_hash": np.array(key)}
    for name, portion in portions.items():
        images, _, kept, _ = decode_samples(portion, preprocess, progress=progress, desc=f"decoding {name}")
        pred = predict_arrays(model, images, batch_size=batch_size, with_masks=False, with_features=True)
        out[f"{name}_features"] = pred["features"]
        out[f"{name}_labels"] = np.array([CLASSES.index(s.label) for s in kept])
        out[f"{name}_keys"] = np.array([s.key for s in kept])
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(cache)
    return out


def fit_ood_checkpoint(checkpoint: str | Path, data: str | Path, out: str | Path | None = None, *,
                       quantile: float = OOD_QUANTILE, progress: bool = True) -> dict:
    """Fit the OOD score on the run's training portion; store it in the checkpoint (``state["ood"]``) and its summary
    in ``calibration.json`` beside it. Returns the summary (with the validation false-refer rate, measured only)."""
    import torch

    checkpoint = Path(checkpoint)
    feats = run_features(checkpoint, data, progress=progress)
    fitted = fit_ood(feats["train_features"], feats["train_labels"], len(CLASSES), quantile)
    val_scores = fitted.score(feats["val_features"])
    summary = {
        "method": "min over classes of the Mahalanobis distance of the pooled class-head feature, shared "
                  "Ledoit-Wolf covariance (Lee et al. 2018)",
        "fitted_on": "training portion of the run (train split minus the validation keys)",
        "n_fit": int(len(feats["train_labels"])), "feature_dim": int(feats["train_features"].shape[1]),
        "shrinkage": fitted.shrinkage, "quantile": quantile, "folds": OOD_FOLDS, "threshold": fitted.threshold,
        "threshold_rule": f"{quantile} quantile of the {OOD_FOLDS}-fold out-of-fold scores of the training portion",
        "val_false_refer_rate": refer_rate(val_scores, fitted.threshold), "n_val": int(len(val_scores)),
        "false_refer_budget": OOD_FALSE_REFER,
    }
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state["ood"] = fitted.to_state()
    state["ood_threshold"] = fitted.threshold
    state.setdefault("calibration", {})["ood"] = summary
    out_path = Path(out) if out else checkpoint
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out_path)
    calibration = out_path.parent / "calibration.json"
    previous = json.loads(calibration.read_text()) if calibration.exists() else {}
    calibration.write_text(json.dumps({**previous, "ood": summary}, indent=2))
    return summary

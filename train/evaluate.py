"""Evaluate predictions on the run's validation split or the dataset's own test split: metrics.json + report.html.

Scoring is torch-free, so the exported model (ONNX Runtime, `braintumor.export.evaluate`) is scored by the same code
as a PyTorch checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .metrics import classification_metrics, segmentation_metrics, to_jsonable
from .naming import CLASSES
from .report import write_report
from .samples import Sample, build_index
from .splits import read_split_csv


def _val_keys(checkpoint: Path, state: dict) -> set[str]:
    if state.get("val_keys"):
        return set(state["val_keys"])
    csv_path = checkpoint.parent / "val_split.csv"
    if csv_path.exists():
        return read_split_csv(csv_path)
    raise FileNotFoundError(f"{checkpoint}: no validation keys inside and no val_split.csv beside it")


def samples_for_split(data: str | Path, split: str, val_keys: set[str] | None = None) -> list[Sample]:
    """The samples of ``split``: the given validation keys, or the dataset's official test split."""
    index = build_index(data)
    if split == "val":
        if not val_keys:
            raise ValueError("this model carries no validation keys; evaluate --split test, or a checkpoint with its run")
        samples = [s for s in index.samples if s.key in val_keys]
        if len(samples) != len(val_keys):
            raise ValueError(f"{data}: only {len(samples)} of the run's {len(val_keys)} validation slices found; "
                             "pass the dataset the run was trained on")
        return samples
    if split == "test":
        samples = index.split("test")
        if not samples:
            raise ValueError(f"{data}: no official test split (classification_task/test or segmentation_task/test)")
        return samples
    raise ValueError(f"split {split!r} is not one of val, test")


def split_samples(checkpoint: Path, state: dict, data: str | Path, split: str) -> list[Sample]:
    """``samples_for_split`` with the validation keys a checkpoint (or its run folder) carries."""
    return samples_for_split(data, split, _val_keys(Path(checkpoint), state) if split == "val" else None)


def cams_for_classes(cams: np.ndarray, classes: np.ndarray, size: int) -> np.ndarray:
    """(N, C, h, w) class activation maps -> (N, size, size) in [0, 1] for one class per image (ReLU, upsample, min-max)."""
    out = np.zeros((len(cams), size, size), np.float32)
    for i, (cam, c) in enumerate(zip(cams, classes)):
        up = np.asarray(Image.fromarray(np.maximum(cam[c], 0).astype(np.float32), "F").resize((size, size), Image.BILINEAR))
        lo, hi = up.min(), up.max()
        out[i] = (up - lo) / max(hi - lo, 1e-8)
    return out


def score_and_report(samples: list[Sample], images: np.ndarray, masks: np.ndarray, probs: np.ndarray,
                     mask_probs: np.ndarray, cams: np.ndarray, out: str | Path, info: dict) -> dict:
    """Metrics (classification on all slices, segmentation on tumour slices) -> metrics.json and report.html."""
    out = Path(out)
    y_true = np.array([CLASSES.index(s.label) for s in samples])
    has_mask = np.array([s.has_mask for s in samples])
    metrics = classification_metrics(y_true, probs)
    if has_mask.any():
        metrics.update(segmentation_metrics(masks[has_mask].astype(bool), mask_probs[has_mask]))
    metrics.update({"n": len(samples), "n_tumour_slices": int(has_mask.sum()), **info})
    out.mkdir(parents=True, exist_ok=True)
    metrics_out = {k: v for k, v in metrics.items() if not k.endswith("_per_slice")}
    (out / "metrics.json").write_text(json.dumps(to_jsonable(metrics_out), indent=2))
    heat = cams_for_classes(cams, probs.argmax(1), images.shape[-1])
    write_report(out, metrics, y_true=y_true, probs=probs, classes=list(CLASSES), masks_true=masks,
                 mask_probs=mask_probs, images=images, cams=heat, keys=[s.key for s in samples])
    return metrics_out


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, split: str, out: str | Path, *,
                        batch_size: int = 32, device: str = "cpu", progress: bool = True) -> dict:
    from .cache import decode_samples
    from .predict import predict_arrays
    from .preprocess import PreprocessConfig
    from .trainer.checkpoint import load_model

    checkpoint = Path(checkpoint)
    model, state = load_model(checkpoint, device)
    preprocess = PreprocessConfig.from_dict(state["preprocess"])
    samples = split_samples(checkpoint, state, data, split)
    images, masks, samples, _ = decode_samples(samples, preprocess, progress=progress, desc=f"decoding {split}")
    temperature = float(state.get("temperature") or 1.0)
    pred = predict_arrays(model, images, batch_size=batch_size, device=device, temperature=temperature, with_cams=True)
    info = {"split": split, "checkpoint": str(checkpoint), "epoch": state.get("epoch"), "temperature": temperature}
    return score_and_report(samples, images, masks, pred["probs"], pred["mask_probs"], pred["cams"], out, info)

"""Evaluate a checkpoint on the run's validation split or the dataset's own test split: metrics.json + report.html."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cache import decode_samples
from .metrics import classification_metrics, segmentation_metrics, to_jsonable
from .naming import CLASSES
from .predict import predict_arrays
from .preprocess import PreprocessConfig
from .report import write_report
from .samples import build_index
from .splits import read_split_csv
from .trainer.checkpoint import load_model


def _val_keys(checkpoint: Path, state: dict) -> set[str]:
    if state.get("val_keys"):
        return set(state["val_keys"])
    csv_path = checkpoint.parent / "val_split.csv"
    if csv_path.exists():
        return read_split_csv(csv_path)
    raise FileNotFoundError(f"{checkpoint}: no validation keys inside and no val_split.csv beside it")


def cams_for_classes(cams: np.ndarray, classes: np.ndarray, size: int) -> np.ndarray:
    """(N, C, h, w) class activation maps -> (N, size, size) in [0, 1] for one class per image (ReLU, upsample, min-max)."""
    picked = torch.from_numpy(cams[np.arange(len(cams)), classes][:, None]).clamp_min(0)
    up = F.interpolate(picked, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    flat = up.reshape(len(up), -1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-8)).reshape(up.shape).numpy()


def split_samples(checkpoint: Path, state: dict, data: str | Path, split: str) -> list:
    """The samples of ``split``: the run's own validation keys, or the dataset's official test split."""
    index = build_index(data)
    if split == "val":
        keys = _val_keys(checkpoint, state)
        samples = [s for s in index.samples if s.key in keys]
        if len(samples) != len(keys):
            raise ValueError(f"{data}: only {len(samples)} of the run's {len(keys)} validation slices found; "
                             "pass the dataset the run was trained on")
        return samples
    if split == "test":
        samples = index.split("test")
        if not samples:
            raise ValueError(f"{data}: no official test split (classification_task/test or segmentation_task/test)")
        return samples
    raise ValueError(f"split {split!r} is not one of val, test")


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, split: str, out: str | Path, *,
                        batch_size: int = 32, device: str = "cpu", progress: bool = True) -> dict:
    checkpoint, out = Path(checkpoint), Path(out)
    model, state = load_model(checkpoint, device)
    preprocess = PreprocessConfig.from_dict(state["preprocess"])
    samples = split_samples(checkpoint, state, data, split)

    images, masks, samples, _ = decode_samples(samples, preprocess, progress=progress, desc=f"decoding {split}")
    pred = predict_arrays(model, images, batch_size=batch_size, device=device,
                          temperature=float(state.get("temperature", 1.0)), with_cams=True)
    y_true = np.array([CLASSES.index(s.label) for s in samples])
    has_mask = np.array([s.has_mask for s in samples])
    metrics = classification_metrics(y_true, pred["probs"])
    if has_mask.any():
        metrics.update(segmentation_metrics(masks[has_mask].astype(bool), pred["mask_probs"][has_mask]))
    metrics.update({"split": split, "n": len(samples), "n_tumour_slices": int(has_mask.sum()),
                    "checkpoint": str(checkpoint), "epoch": state.get("epoch"), "temperature": state.get("temperature", 1.0)})

    out.mkdir(parents=True, exist_ok=True)
    metrics_out = {k: v for k, v in metrics.items() if not k.endswith("_per_slice")}
    (out / "metrics.json").write_text(json.dumps(to_jsonable(metrics_out), indent=2))
    cams = cams_for_classes(pred["cams"], pred["probs"].argmax(1), preprocess.image_size)
    write_report(out, metrics, y_true=y_true, probs=pred["probs"], classes=list(CLASSES), masks_true=masks,
                 mask_probs=pred["mask_probs"], images=images, cams=cams, keys=[s.key for s in samples])
    return metrics_out

"""Evaluate predictions on the run's validation split or the dataset's own test split: metrics.json + report.html.

Scoring is torch-free, so the exported model (ONNX Runtime, `braintumor.export.evaluate`) is scored by the same code
as a PyTorch checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .decode import decode_image, decode_mask
from .heatmap import cam_heatmap
from .metrics import classification_metrics, dice_iou, pointing_game_hits, segmentation_metrics, to_jsonable
from .naming import CLASSES, NO_TUMOR
from .ood import OodModel
from .preprocess import Geometry, PreprocessConfig, compute_geometry, mask_to_original
from .refer import ReferRules, decide, refer_policy_stats
from .report import write_report
from .samples import Sample, build_index
from .splits import checkpoint_val_keys


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
    return samples_for_split(data, split, checkpoint_val_keys(checkpoint, state) if split == "val" else None)


def cams_for_classes(cams: np.ndarray, classes: np.ndarray, size: int) -> np.ndarray:
    """(N, C, h, w) class activation maps -> (N, size, size) in [0, 1] for one class per image (ReLU, upsample, min-max)."""
    out = np.zeros((len(cams), size, size), np.float32)
    for i, (cam, c) in enumerate(zip(cams, classes)):
        out[i] = cam_heatmap(cam[c], size)  # the API's rule too (serving/postprocess.gradcam_heatmap)
    return out


def original_resolution_segmentation(samples: list[Sample], mask_probs: np.ndarray, preprocess: PreprocessConfig,
                                     geometries: list[Geometry] | None = None,
                                     ) -> dict[str, np.ndarray]:
    """Per-slice Dice and IoU on the ORIGINAL image: each predicted (S, S) mask is mapped back with the inverse
    geometry exactly as serving answers (``mask_to_original``) and compared with the original mask file.
    NaN for slices without a tumour mask. ``geometries`` (``decode_samples(..., geometries=True)``) spare decoding
    each image again to compute its geometry."""
    dice, iou = np.full(len(samples), np.nan), np.full(len(samples), np.nan)
    for i, (sample, probs) in enumerate(zip(samples, mask_probs)):
        if not sample.has_mask:
            continue
        geometry = (geometries[i] if geometries is not None
                    else compute_geometry(decode_image(sample.image_path).pixels, preprocess))
        truth = decode_mask(sample.mask_path, preprocess.mask_threshold).astype(bool)
        pred = mask_to_original(np.asarray(probs, np.float32), geometry).astype(bool)
        d, j = dice_iou(truth[None], pred[None])
        dice[i], iou[i] = d[0], j[0]
    return {"dice_per_slice": dice, "iou_per_slice": iou}


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def score_and_report(samples: list[Sample], images: np.ndarray, masks: np.ndarray, probs: np.ndarray,
                     mask_probs: np.ndarray, cams: np.ndarray, out: str | Path, info: dict, *,
                     preprocess: PreprocessConfig | None = None, refer_threshold: float | None = None,
                     disagree_min_area: float | None = None, geometries: list[Geometry] | None = None,
                     ood_scores: np.ndarray | None = None, ood_threshold: float | None = None) -> dict:
    """Metrics (classification on all slices, segmentation on tumour slices at the model input and, with
    ``preprocess``, at the original resolution; pointing game of the true class's Grad-CAM, of the served heatmap
    (the predicted class's, ``pointing_game_heatmap``) and of the mask peak; the refer policies;
    with ``ood_scores`` and ``ood_threshold``, the share of slices the learned OOD check refers: on in-distribution
    slices, its false-refer rate) -> metrics.json and report.html."""
    out = Path(out)
    y_true = np.array([CLASSES.index(s.label) for s in samples])
    has_mask = np.array([s.has_mask for s in samples])
    metrics = classification_metrics(y_true, probs)
    # the heatmap /analyze serves: the predicted class's map through the API's heatmap rule (train/heatmap.py)
    heat = cams_for_classes(cams, probs.argmax(1), images.shape[-1])
    if has_mask.any():
        # Dice/IoU over tumour slices; empty_fp_rate over the no_tumor slices, whose truth is empty though BRISC
        # ships no mask file for them (without them the rate had no slices to count and was NaN)
        known = has_mask | (y_true == CLASSES.index(NO_TUMOR))
        metrics.update(segmentation_metrics(masks[known].astype(bool), mask_probs[known]))
        tumour = masks[has_mask].astype(bool)
        cam_true = np.maximum(cams[np.flatnonzero(has_mask), y_true[has_mask]], 0)
        metrics["pointing_game_gradcam"] = _nanmean(pointing_game_hits(cam_true, tumour))
        metrics["pointing_game_mask_peak"] = _nanmean(pointing_game_hits(mask_probs[has_mask], tumour))
        # what a radiologist is shown: its peak in the (dilated) tumour, whichever class the model decided
        metrics["pointing_game_heatmap"] = _nanmean(pointing_game_hits(heat[has_mask], tumour))
        if preprocess is not None:
            original = original_resolution_segmentation(samples, mask_probs, preprocess, geometries=geometries)
            metrics["dice_original"] = _nanmean(original["dice_per_slice"])
            metrics["iou_original"] = _nanmean(original["iou_per_slice"])
    rules = ReferRules(refer_threshold, disagree_min_area, ood_threshold)
    flags = decide(probs, mask_probs, ood_scores, rules)  # the rules serving applies, on the whole split
    disagree = flags.disagree if disagree_min_area is not None else np.zeros(len(probs), bool)
    metrics["refer_policies"] = {
        "threshold": refer_policy_stats(y_true, probs, refer_threshold, None),
        "threshold+disagreement": refer_policy_stats(
            y_true, probs, refer_threshold, disagree if disagree_min_area is not None else None),
        "refer_threshold": refer_threshold, "disagree_min_area": disagree_min_area,
    }
    if ood_scores is not None and ood_threshold is not None:
        ood = flags.ood
        metrics["refer_policies"]["threshold+disagreement+ood"] = refer_policy_stats(
            y_true, probs, refer_threshold, disagree | ood)
        metrics["ood"] = {"threshold": float(ood_threshold), "refer_rate": float(ood.mean()),
                          "n_referred": int(ood.sum()), "max_score": float(np.max(ood_scores))}
    metrics.update({"n": len(samples), "n_tumour_slices": int(has_mask.sum()), **info})
    out.mkdir(parents=True, exist_ok=True)
    metrics_out = {k: v for k, v in metrics.items() if not k.endswith("_per_slice")}
    (out / "metrics.json").write_text(json.dumps(to_jsonable(metrics_out), indent=2))
    write_report(out, metrics, y_true=y_true, probs=probs, classes=list(CLASSES), masks_true=masks,
                 mask_probs=mask_probs, images=images, cams=heat, keys=[s.key for s in samples])
    return metrics_out


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, split: str, out: str | Path, *,
                        batch_size: int = 32, device: str = "cpu", progress: bool = True) -> dict:
    from .cache import decode_samples
    from .predict import predict_arrays
    from .trainer.checkpoint import load_model

    checkpoint = Path(checkpoint)
    model, state = load_model(checkpoint, device)
    preprocess = PreprocessConfig.from_dict(state["preprocess"])
    samples = split_samples(checkpoint, state, data, split)
    images, masks, samples, _, geometries = decode_samples(samples, preprocess, progress=progress,
                                                           desc=f"decoding {split}", geometries=True)
    temperature = float(state.get("temperature") or 1.0)
    pred = predict_arrays(model, images, batch_size=batch_size, device=device, temperature=temperature, with_cams=True,
                          with_features=bool(state.get("ood")))
    info = {"split": split, "checkpoint": str(checkpoint), "epoch": state.get("epoch"), "temperature": temperature}
    ood = OodModel.from_state(state["ood"]) if state.get("ood") else None
    return score_and_report(samples, images, masks, pred["probs"], pred["mask_probs"], pred["cams"], out, info,
                            preprocess=preprocess, refer_threshold=state.get("refer_threshold"),
                            disagree_min_area=state.get("disagree_min_area"), geometries=geometries,
                            ood_scores=ood.score(pred["features"]) if ood else None,
                            ood_threshold=ood.threshold if ood else None)

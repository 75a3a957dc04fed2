"""MODEL_CARD.md of a trained checkpoint: ``build_model_card`` predicts with the checkpoint on the run's validation
split, computes the card's numbers (:mod:`.card_metrics`, the refer rules of :mod:`.refer`) and writes MODEL_CARD.md
(rendered by :mod:`.card_render`, torch-free) plus its JSON twin.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .card_metrics import _estimate, card_metrics, ood_metrics
from .card_render import render_model_card
from .metrics import (
    bootstrap_ci,
    expected_calibration_error,
    softmax,
    to_jsonable,
)
from .naming import CLASSES
from .refer import ReferRules, decide, ood_flags


# --------------------------------------------------------------------------- glue (torch)


def read_history(path: str | Path) -> dict[str, Any]:
    """Training time and throughput from history.csv: epochs, sum of epoch_seconds, median images/s, the val curve."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))

    def col(name: str) -> list[float]:
        return [float(r[name]) for r in rows if r.get(name) not in (None, "")]

    keep = ("epoch", "val_accuracy", "val_macro_f1", "val_dice")
    return {
        "epochs_trained": len(rows),
        "training_seconds": float(sum(col("epoch_seconds"))) if col("epoch_seconds") else None,
        "images_per_s": statistics.median(col("train_images_per_s")) if col("train_images_per_s") else None,
        "history": [{k: (int(r[k]) if k == "epoch" else float(r[k])) for k in keep if r.get(k) not in (None, "")}
                    for r in rows],
    }


def _describe_device(runtime: Mapping[str, Any]) -> str:
    device = runtime.get("device") or "not recorded"
    threads = runtime.get("threads")
    return f"device setting `{device}`" + (f", {threads} CPU threads" if threads else "")


def _non_square(paths: Sequence[str]) -> np.ndarray:
    from PIL import Image

    flags = []
    for path in paths:
        with Image.open(path) as img:  # reads the header only
            w, h = img.size
        flags.append(w != h)
    return np.array(flags, dtype=bool)


def build_model_card(checkpoint: str | Path, data: str | Path, out_md: str | Path, *, history_csv: str | Path | None = None,
                     n_boot: int = 1000, progress: bool = True, info: Mapping[str, Any] | None = None,
                     batch_size: int = 32, previous: str | Path | None = None) -> dict:
    """Predict with ``checkpoint`` on its run's validation split of ``data``; write ``out_md`` and ``out_md``.json.

    ``history_csv`` defaults to history.csv beside the checkpoint (skipped when absent). ``info`` overrides or adds
    card facts the checkpoint cannot know (e.g. ``version``, ``export_format``, ``device``). ``previous``: the JSON twin
    of the released model's card before this one, shown side by side. Returns the metrics.
    """
    from .cache import decode_samples
    from .evaluate import original_resolution_segmentation, split_samples
    from .predict import predict_arrays
    from .preprocess import PreprocessConfig
    from .samples import build_index
    from .trainer.checkpoint import load_model

    checkpoint, out_md = Path(checkpoint), Path(out_md)
    model, state = load_model(checkpoint)
    preprocess = PreprocessConfig.from_dict(state["preprocess"])
    samples = split_samples(checkpoint, state, data, "val")
    images, masks, samples, _, geometries = decode_samples(samples, preprocess, progress=progress, desc="decoding val",
                                                           geometries=True)
    temperature = float(state.get("temperature", 1.0))
    pred = predict_arrays(model, images, batch_size=batch_size, temperature=temperature, with_cams=True,
                          with_features=True)
    y = np.array([CLASSES.index(s.label) for s in samples])
    ood = _ood_card(model, state, pred["features"], preprocess, n_boot) if state.get("ood") else None

    min_area = state.get("disagree_min_area")
    # The refer rules serving applies (train/refer.decide); the learned OOD flags come from _ood_card's scores.
    flags = decide(pred["probs"], pred["mask_probs"], None, ReferRules(state.get("refer_threshold"), min_area))
    disagree = flags.disagree if min_area is not None else None
    metrics = card_metrics(y, pred["probs"], masks.astype(bool), pred["mask_probs"], pred["cams"],
                           _non_square([s.image_path for s in samples]), refer_threshold=state.get("refer_threshold"),
                           n_boot=n_boot, classes=CLASSES, disagree=disagree,
                           ood=None if ood is None else ood.pop("val_flags"),
                           seg_original=original_resolution_segmentation(samples, pred["mask_probs"], preprocess,
                                                                         geometries=geometries))
    if ood is not None:
        metrics["ood"] = ood
    summary = state.get("calibration") or {}
    uncalibrated = softmax(pred["logits"])
    ece_before = bootstrap_ci(lambda i: expected_calibration_error(uncalibrated[i], y[i]), np.arange(len(y)),
                              n_boot=n_boot, seed=metrics["seed"])
    metrics["calibration"] = {
        "temperature": temperature if summary else None,  # a checkpoint never calibrated holds T = 1 by default
        "ece_before": _estimate(expected_calibration_error(uncalibrated, y), ece_before, len(y)),
        "ece_after": metrics["classification"]["ece"],
        "refer_threshold": state.get("refer_threshold"),
        "disagree_min_area": min_area,
        "target_accuracy": summary.get("target_accuracy"),
        "fitted_on": summary.get("fitted_on"),
    }

    run_config = state.get("run_config") or {}
    n_train_split = len(build_index(data).split("train"))
    limit = (run_config.get("data") or {}).get("limit")
    card_info: dict[str, Any] = {
        "checkpoint": checkpoint.name, "epoch": state.get("epoch"), "model_config": state.get("model_config"),
        "preprocess": state.get("preprocess"), "run_config": run_config, "init_weights": state.get("init_weights"),
        "device": _describe_device(run_config.get("runtime") or {}),
        "data": {"n_train": (min(limit, n_train_split) if limit else n_train_split) - len(samples), "n_val": len(samples),
                 "val_by_class": {c: int((y == k).sum()) for k, c in enumerate(CLASSES)}},
    }
    history_csv = Path(history_csv) if history_csv else checkpoint.parent / "history.csv"
    if history_csv.exists():
        card_info.update(read_history(history_csv))
    card_info.update(info or {})
    if previous is not None:
        card_info["previous"] = json.loads(Path(previous).read_text())

    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(render_model_card(metrics, card_info))
    out_md.with_suffix(".json").write_text(json.dumps(to_jsonable({"metrics": metrics, "info": card_info}), indent=2) + "\n")
    return metrics


def _ood_card(model, state: Mapping[str, Any], val_features: np.ndarray, preprocess, n_boot: int) -> dict[str, Any]:
    """``ood_metrics`` of the checkpoint's fitted OOD score on the validation features and on the probe set (each
    probe through the same preprocessing), plus ``val_flags`` for the refer policies."""
    from .ood import OodModel
    from .ood_probe import probe_images, probe_kind
    from .predict import predict_arrays
    from .preprocess import preprocess as preprocess_image

    fitted = OodModel.from_state(state["ood"])
    probes = probe_images()
    inputs = np.stack([preprocess_image(p, preprocess)[0] for p in probes.values()])
    probe_scores = fitted.score(predict_arrays(model, inputs, with_masks=False, with_features=True)["features"])
    val_scores = fitted.score(val_features)
    out = ood_metrics(val_scores, dict(zip(probes, probe_scores)), fitted.threshold,
                      {n: probe_kind(n) for n in probes}, n_boot=n_boot,
                      fit=(state.get("calibration") or {}).get("ood"))
    return {**out, "val_flags": ood_flags(val_scores, fitted.threshold)}

"""Post-hoc calibration on the run's validation split: temperature scaling, the `refer` threshold and the mask-label
disagreement area (see :mod:`.refer`), saved in the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .cache import decode_samples
from .evaluate import split_samples
from .metrics import expected_calibration_error, fit_temperature, softmax, to_jsonable
from .naming import CLASSES
from .predict import predict_arrays
from .preprocess import PreprocessConfig
from .refer import DISAGREE_FALSE_REFER, ReferRules, decide, fit_disagree_min_area, mask_area, refer_policy_stats
from .trainer.checkpoint import load_model


def refer_threshold(confidence: np.ndarray, correct: np.ndarray, target_accuracy: float = 0.99) -> float:
    """Lowest threshold t such that the cases with confidence >= t are right at least ``target_accuracy`` of the time.

    Returns 1.0 + eps (refer everything) when no threshold reaches the target.
    """
    order = np.argsort(-confidence, kind="stable")
    conf, hits = confidence[order], correct[order].astype(float)
    accepted_accuracy = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    # Only cut between distinct confidences: ties are all accepted or all referred.
    last_of_tie = np.r_[conf[1:] != conf[:-1], True]
    ok = np.flatnonzero((accepted_accuracy >= target_accuracy) & last_of_tie)
    return float(conf[ok[-1]]) if ok.size else float(np.nextafter(1.0, 2.0))


def calibrate_checkpoint(checkpoint: str | Path, data: str | Path, out: str | Path | None = None, *,
                         target_accuracy: float = 0.99, progress: bool = True) -> dict:
    """Fit T and the refer threshold on the validation split; write them into ``out`` (default: in place)."""
    checkpoint = Path(checkpoint)
    model, state = load_model(checkpoint)
    preprocess = PreprocessConfig.from_dict(state["preprocess"])
    samples = split_samples(checkpoint, state, data, "val")
    images, _, samples, _ = decode_samples(samples, preprocess, progress=progress, desc="decoding val")
    pred = predict_arrays(model, images)
    logits = pred["logits"]
    y = np.array([CLASSES.index(s.label) for s in samples])

    temperature = fit_temperature(logits, y)
    before, after = softmax(logits), softmax(logits, temperature)
    threshold = refer_threshold(after.max(1), after.argmax(1) == y, target_accuracy)
    labels, areas = after.argmax(1), mask_area(pred["mask_probs"])
    min_area = fit_disagree_min_area(labels, y, areas)
    disagree = decide(after, pred["mask_probs"], None, ReferRules(threshold, min_area)).disagree
    policies = {"threshold": refer_policy_stats(y, after, threshold, None),
                "threshold+disagreement": refer_policy_stats(y, after, threshold, disagree)}
    by_threshold = policies["threshold"]
    summary = {
        "temperature": temperature,
        "ece_before": expected_calibration_error(before, y),
        "ece_after": expected_calibration_error(after, y),
        "refer_threshold": threshold,
        "target_accuracy": target_accuracy,
        "refer_rate": by_threshold["refer_rate"],
        "accepted_accuracy": by_threshold["accepted_accuracy"] if by_threshold["n_accepted"] else None,
        "n": int(len(y)),
        "fitted_on": "validation split of the run",
        "disagree_min_area": min_area,
        "disagree_false_refer_budget": DISAGREE_FALSE_REFER,
        "policies": policies,
    }
    state["temperature"] = temperature
    state["refer_threshold"] = threshold
    state["disagree_min_area"] = min_area
    state["calibration"] = summary
    out_path = Path(out) if out else checkpoint
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out_path)
    (out_path.parent / "calibration.json").write_text(json.dumps(to_jsonable(summary), indent=2))
    return summary

"""Evaluate an exported model version through ONNX Runtime (no torch, no checkpoint): same scoring as a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..train.cache import decode_samples
from ..train.evaluate import samples_for_split, score_and_report
from ..train.preprocess import PreprocessConfig
from .contract import CAM, CLASS_PROBS, DEFAULT_NAME, INPUT_NAME, MASK_PROB, METADATA_FILE, ONNX_FILE, OOD_SCORE
from .manifest import verify_manifest
from .triton_config import latest_version


def evaluate_repository(repository: str | Path, data: str | Path, split: str, out: str | Path, *,
                        name: str = DEFAULT_NAME, version: int | None = None, batch_size: int = 32,
                        progress: bool = True) -> dict:
    import onnxruntime as ort

    model_dir = Path(repository) / name
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model not found in the repository; pass --name or export it first")
    folder = model_dir / str(version) if version is not None else latest_version(model_dir)
    verify_manifest(folder)
    meta = json.loads((folder / METADATA_FILE).read_text())
    preprocess = PreprocessConfig.from_dict(meta["preprocess"])
    samples = samples_for_split(data, split, set(meta.get("validation_keys") or []))
    images, masks, samples, _, geometries = decode_samples(samples, preprocess, progress=progress,
                                                           desc=f"decoding {split}", geometries=True)

    session = ort.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    outputs: dict[str, list[np.ndarray]] = {CLASS_PROBS: [], MASK_PROB: [], CAM: []}
    if OOD_SCORE in {o.name for o in session.get_outputs()}:  # models exported with a fitted OOD score
        outputs[OOD_SCORE] = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size][:, None]
        for key, value in zip(outputs, session.run(list(outputs), {INPUT_NAME: batch})):
            outputs[key].append(value)
    probs, mask_probs, cams = (np.concatenate(outputs[k]) for k in (CLASS_PROBS, MASK_PROB, CAM))
    info = {"split": split, "model": name, "version": meta["version"], "runtime": f"onnxruntime {ort.__version__}",
            "temperature": meta.get("temperature")}
    ood_scores = np.concatenate(outputs[OOD_SCORE])[:, 0] if OOD_SCORE in outputs else None
    return score_and_report(samples, images, masks, probs, mask_probs[:, 0], cams, out, info, preprocess=preprocess,
                            refer_threshold=meta.get("refer_threshold"), disagree_min_area=meta.get("disagree_min_area"),
                            geometries=geometries, ood_scores=ood_scores, ood_threshold=meta.get("ood_threshold"))

"""Would decoding JPEGs at reduced scale (Pillow's ``draft``: libjpeg's DCT scaling) pay? Times decode + preprocess
at full scale (what serving does) and at 1/2 and 1/4 scale on real validation slices, then runs the exported model on
both inputs and compares the outputs with the export's fp16 parity tolerance. A measurement, not a test.

    python loadtest/bench_jpeg_draft.py --model-repository model_repository --data ../shared/data/brisc2025

Reduced-scale decoding only pays if the served probabilities stay within that tolerance; the verdict line says so.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np

from braintumor.export import contract
from braintumor.export.fp16_storage import FP16_PARITY_TOLERANCES
from braintumor.train.decode import _to_grey, decode_any, upright
from braintumor.train.preprocess import PreprocessConfig, preprocess


def drafted(data: bytes, cfg: PreprocessConfig, scale: int) -> np.ndarray:
    """Model input from a JPEG decoded at 1/scale (the same grey conversion and preprocessing as serving)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if scale > 1:
            img.draft(img.mode, (img.width // scale, img.height // scale))
        img.load()
        pixels = upright(_to_grey(img)[0], img)
    return preprocess(pixels, cfg)[0]


def full(data: bytes, cfg: PreprocessConfig) -> np.ndarray:
    decoded, _ = decode_any(data)
    return preprocess(decoded.pixels, cfg)[0]


def main() -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repository", default="model_repository")
    ap.add_argument("--model", default=contract.DEFAULT_NAME)
    ap.add_argument("--data", required=True, help="BRISC root; the model's validation slices are used")
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3, help="timing passes; the fastest is reported")
    args = ap.parse_args()

    version = sorted((Path(args.model_repository) / args.model).glob("[0-9]*"), key=lambda p: int(p.name))[-1]
    meta = json.loads((version / "metadata.json").read_text())
    cfg = PreprocessConfig.from_dict(meta["preprocess"])
    keys = set(meta.get("validation_keys") or [])
    paths = [p for p in sorted(Path(args.data).glob("classification_task/*/*/*.jpg")) if not keys or p.stem in keys]
    paths = paths[:: max(1, len(paths) // args.count)][: args.count]
    datas = [p.read_bytes() for p in paths]
    session = ort.InferenceSession(str(version / contract.ONNX_FILE), providers=["CPUExecutionProvider"])
    names = list(contract.FULL_OUTPUTS)

    def run(images: list[np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {contract.INPUT_NAME: np.stack(images)[:, None]})))

    ways = {"full (now)": lambda d: full(d, cfg), "draft 1/2": lambda d: drafted(d, cfg, 2),
            "draft 1/4": lambda d: drafted(d, cfg, 4)}
    print(f"{len(datas)} validation JPEGs ({'validation keys' if keys else 'no validation keys: all'}), model "
          f"{args.model}/{version.name} at {cfg.image_size} px\n")
    print("| decode | ms/img (decode + preprocess) | max abs class_probs | max abs mask_prob | argmax changed |")
    print("|---|---:|---:|---:|---:|")
    reference = None
    verdict = []
    for name, way in ways.items():
        images = [way(d) for d in datas]
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for d in datas:
                way(d)
            best = min(best, (time.perf_counter() - t0) / len(datas))
        outputs = run(images)
        if reference is None:
            reference = outputs
        diff = {n: float(np.abs(outputs[n] - reference[n]).max()) for n in (contract.CLASS_PROBS, contract.MASK_PROB)}
        changed = int((outputs[contract.CLASS_PROBS].argmax(1) != reference[contract.CLASS_PROBS].argmax(1)).sum())
        print(f"| {name} | {best * 1e3:.2f} | {diff[contract.CLASS_PROBS]:.4f} | {diff[contract.MASK_PROB]:.4f} "
              f"| {changed} |")
        if name != "full (now)":
            within = diff[contract.CLASS_PROBS] <= FP16_PARITY_TOLERANCES[contract.CLASS_PROBS][0]
            verdict.append(f"{name}: {'within' if within else 'OUTSIDE'} the class_probs parity atol "
                           f"{FP16_PARITY_TOLERANCES[contract.CLASS_PROBS][0]:g}")
    print("\n" + "; ".join(verdict))


if __name__ == "__main__":
    main()

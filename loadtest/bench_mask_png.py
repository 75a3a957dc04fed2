"""How much does encoding the answer's mask cost? Real BRISC masks at their original size, each encoder timed on the
same masks, one run; prints ms per mask, bytes and the SDK's decode time. A measurement, not a test.

    python loadtest/bench_mask_png.py --data ../shared/data/brisc2025 [--count 200] [--repeat 5]

Candidates: what serving does for ``mask_format=png`` (Pillow, L mode, compress_level 1, ``clients/masks.mask_png``)
and for ``mask_format=rle`` (COCO run-length encoding by pycocotools, ``clients/masks.encode_rle``; its bytes are the
JSON of ``{"size", "counts"}``, its decode is the SDK's ``decode_rle``), other Pillow levels and zlib strategy, Pillow
1-bit, and OpenCV (``cv2.imencode``: compression 0/1, the RLE strategy, bi-level). Each row's output is checked to
decode to the same mask, so a fast encoder that loses pixels cannot win. PNG bytes are raw; HTTP's JSON carries them
base64-encoded (4/3 of that), gRPC as they are.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np


def load_masks(data: str, count: int, empty: int) -> list[np.ndarray]:
    """``count`` tumour masks (0/1 uint8, original size) spread over the split, plus ``empty`` all-zero masks of the
    same sizes (the no_tumor answer, about a quarter of real traffic)."""
    from PIL import Image

    paths = sorted(Path(data).glob("segmentation_task/*/masks/*.png"))
    if not paths:
        raise SystemExit(f"no masks under {data}/segmentation_task/<split>/masks/")
    picked = paths[:: max(1, len(paths) // count)][:count]
    masks = [(np.asarray(Image.open(p).convert("L")) > 127).astype(np.uint8) for p in picked]
    return masks + [np.zeros_like(m) for m in masks[:empty]]


def encoders() -> dict:
    """name -> (encode: mask -> wire bytes or object, decode: that -> bool mask, size: that -> bytes on the wire)."""
    import cv2
    from PIL import Image

    from braintumor.clients.masks import decode_rle, encode_rle, mask_png

    png = (decode, len)

    def pillow(level: int, bits: int, strategy: int = -1):
        def run(mask: np.ndarray) -> bytes:
            buf = io.BytesIO()
            image = Image.fromarray(mask * np.uint8(255)) if bits == 8 else Image.fromarray(mask.astype(bool))
            image.save(buf, format="PNG", compress_level=level, compress_type=strategy)
            return buf.getvalue()
        return run

    def opencv(level: int, *extra: int):
        params = [cv2.IMWRITE_PNG_COMPRESSION, level, *extra]

        def run(mask: np.ndarray) -> bytes:
            ok, out = cv2.imencode(".png", mask * np.uint8(255), params)
            if not ok:
                raise RuntimeError("cv2.imencode failed")
            return out.tobytes()
        return run

    return {
        "Pillow L, level 1 (served: mask_format=png)": (mask_png, *png),
        "COCO RLE, pycocotools (served: mask_format=rle)": (encode_rle, decode_rle, lambda rle: len(json.dumps(rle))),
        "Pillow L, level 0": (pillow(0, 8), *png),
        "Pillow L, level 6": (pillow(6, 8), *png),
        "Pillow L, level 6, zlib Z_RLE": (pillow(6, 8, 3), *png),
        "Pillow 1-bit, level 1": (pillow(1, 1), *png),
        "Pillow 1-bit, level 6": (pillow(6, 1), *png),
        "OpenCV L, level 1": (opencv(1), *png),
        "OpenCV L, level 0": (opencv(0), *png),
        "OpenCV L, level 1, RLE strategy": (opencv(1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE), *png),
        "OpenCV bi-level, level 1": (opencv(1, cv2.IMWRITE_PNG_BILEVEL, 1), *png),
    }


def decode(data: bytes) -> np.ndarray:
    """What the SDK does (clients/results.py ``mask_array``), made to accept 1-bit PNGs too."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as picture:
        return np.asarray(picture.convert("L")) > 127


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="BRISC root (segmentation_task/<split>/masks/*.png)")
    ap.add_argument("--count", type=int, default=200, help="tumour masks")
    ap.add_argument("--empty", type=int, default=60, help="empty masks added (no_tumor answers)")
    ap.add_argument("--repeat", type=int, default=5, help="passes over the masks; the median pass is reported")
    args = ap.parse_args()

    masks = load_masks(args.data, args.count, args.empty)
    pixels = sum(m.size for m in masks) / len(masks)
    print(f"{len(masks)} masks ({args.count} tumour, {min(args.empty, args.count)} empty), mean {pixels / 1e3:.0f} kpx; "
          f"median of {args.repeat} passes\n")
    print("| encoder | encode ms/mask | bytes/mask | SDK decode ms/mask |")
    print("|---|---:|---:|---:|")
    for name, (encode, decode_one, size_of) in encoders().items():
        outputs = [encode(m) for m in masks]  # warm-up, and the lossless check below
        for mask, data in zip(masks, outputs):
            if not np.array_equal(decode_one(data), mask.astype(bool)):
                raise SystemExit(f"{name}: decoded mask differs from the input")
        passes = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for m in masks:
                encode(m)
            passes.append((time.perf_counter() - t0) / len(masks))
        t0 = time.perf_counter()
        for data in outputs:
            decode_one(data)
        dec = (time.perf_counter() - t0) / len(outputs)
        size = sum(size_of(d) for d in outputs) / len(outputs)
        print(f"| {name} | {statistics.median(passes) * 1e3:.3f} | {size:.0f} | {dec * 1e3:.3f} |")


if __name__ == "__main__":
    main()

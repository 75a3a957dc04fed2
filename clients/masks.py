"""The tumour mask's two wire forms, once, for the server that writes them and the SDK that reads them: ``png`` (grey
PNG, 255 tumour / 0 background, Pillow compress_level 1) and ``rle`` (COCO run-length encoding, the JSON form
``{"size": [height, width], "counts": "<compressed counts>"}`` that pycocotools and other COCO tools read).
numpy, Pillow and pycocotools are imported on first use: the CLI lists the formats without loading them."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

MASK_FORMATS = ("png", "rle")  # the first is the default: what every answer carried before mask_format existed


def check_mask_format(value: str | None) -> str:
    """``value`` if it is a known mask format (None or "" mean the default, ``png``); ValueError naming them."""
    if not value:
        return MASK_FORMATS[0]
    if value not in MASK_FORMATS:
        raise ValueError(f"unknown mask_format {value!r}; use one of {', '.join(MASK_FORMATS)}")
    return value


def requested(mask_format: str) -> str:
    """What a request carries for ``mask_format``: nothing ("") for the default, so a default request is the one it
    was before the field existed and a server older than it still answers; the format's name otherwise."""
    return "" if mask_format == MASK_FORMATS[0] else mask_format


def mask_png(mask: np.ndarray) -> bytes:
    """(H, W) mask (bool or 0/1) -> L PNG, 255 tumour / 0 background. Fast compression: made per request."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8) * np.uint8(255)).save(buf, format="PNG",
                                                                                      compress_level=1)
    return buf.getvalue()


def encode_rle(mask: np.ndarray) -> dict:
    """(H, W) mask (bool or 0/1) -> ``{"size": [H, W], "counts": str}``, COCO's compressed RLE as JSON carries it."""
    import numpy as np
    from pycocotools import mask as coco

    if mask.ndim != 2:
        raise ValueError(f"a mask is one (height, width) array; got shape {mask.shape}")
    mask = mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8, copy=False)
    # COCO runs go down the columns, so pycocotools wants column-major pixels: OpenCV's transpose, seen transposed,
    # is that array, in half the time of np.asfortranarray (which was most of the encoding's cost).
    rle = coco.encode(_transposed(mask).T)
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    """``{"size": [H, W], "counts": str | bytes}`` -> the (H, W) bool mask; ValueError when it is not that shape."""
    from pycocotools import mask as coco

    size, counts = rle.get("size"), rle.get("counts")
    if (not isinstance(size, (list, tuple)) or len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size)
            or not isinstance(counts, (str, bytes)) or not counts):
        raise ValueError(f"not a COCO RLE mask: expected {{'size': [height, width], 'counts': str}}, got "
                         f"size={size!r} and counts of type {type(counts).__name__}")
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    decoded = coco.decode({"size": [int(size[0]), int(size[1])], "counts": counts})  # column-major 0/1 uint8
    return _transposed(decoded.T).view(bool)


def _transposed(array: np.ndarray) -> np.ndarray:
    """The row-major transpose of a 2-D uint8 array: OpenCV's, about twice as fast as numpy copying ``.T``."""
    import cv2
    import numpy as np

    return cv2.transpose(np.ascontiguousarray(array))

"""Class activation map -> heatmap: the one rule for the evaluation report, the torch explainer and the API.

ReLU (only evidence for the class), bilinear upsampling to the image (half-pixel centres, as
``F.interpolate(mode="bilinear", align_corners=False)``), min-max to [0, 1]; a map with no positive evidence is all
zeros. Torch-free (numpy + Pillow), so serving and the report share it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_EPS = 1e-12


def cam_heatmap(cam: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """One (h, w) class activation map -> (H, W) float32 heatmap in [0, 1]; ``size`` is S or (H, W)."""
    height, width = (size, size) if isinstance(size, int) else size
    relu = np.maximum(np.ascontiguousarray(cam, dtype=np.float32), 0.0)
    if relu.ndim != 2:
        raise ValueError(f"a class activation map is (h, w), got shape {relu.shape}")
    up = np.asarray(Image.fromarray(relu, "F").resize((int(width), int(height)), Image.BILINEAR), dtype=np.float32)
    lo, hi = float(up.min()), float(up.max())
    return (up - lo) / max(hi - lo, _EPS)


def heatmap_levels(heat: np.ndarray) -> np.ndarray:
    """A [0, 1] heatmap as uint8 levels 0..255 (the API's PNGs and the overlay)."""
    return np.clip(np.rint(np.asarray(heat, np.float32) * 255), 0, 255).astype(np.uint8)

"""The one preprocessing contract, torch-free: a decoded greyscale slice -> square geometry -> uint8 model input,
and back (masks and heatmaps onto the original image).

Training, evaluation, export and serving all call these functions with a :class:`PreprocessConfig`
that is saved inside every checkpoint and exported model, so the pixels a model sees never drift. Decoding bytes
into pixels is :mod:`.decode`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image

GEOMETRIES = ("crop_pad", "pad", "resize")
# A predicted mask pixel is tumour at or above this probability: the one cut for serving's masks, evaluation, the model
# card and the refer rules' mask area.
MASK_THRESHOLD = 0.5


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that turns a decoded slice into model input. Saved as a plain dict with the weights."""

    image_size: int = 256
    # crop_pad: crop to the head's bounding box, pad to square, resize. It removes the canvas shape
    # (the no_tumor aspect-ratio shortcut) that `pad` keeps and `resize` turns into stretched anatomy.
    geometry: str = "crop_pad"
    foreground_threshold: int = 20  # grey level above which a pixel counts as head, for the crop box
    crop_margin: float = 0.04  # fraction of the box side kept around the head
    mask_threshold: int = 128  # BRISC masks have soft edges
    # Normalisation of the uint8 input, applied inside the model graph (0..255 scale); measured on BRISC train at crop_pad.
    mean: float = 48.0
    std: float = 46.0
    version: int = 1

    def __post_init__(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry {self.geometry!r} is not one of {GEOMETRIES}")
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size {self.image_size} is outside 16..1024")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Geometry:
    """How an original (H, W) slice maps onto the square model input; invertible for masks and heatmaps."""

    original_shape: tuple[int, int]
    crop: tuple[int, int, int, int]  # y0, y1, x0, x1 in the original image
    pad: tuple[int, int, int, int]  # top, bottom, left, right added to the crop
    size: int  # output side length

    @property
    def square_side(self) -> int:
        y0, y1, x0, x1 = self.crop
        top, bottom, _, _ = self.pad
        return (y1 - y0) + top + bottom


def compute_geometry(pixels: np.ndarray, cfg: PreprocessConfig) -> Geometry:
    h, w = pixels.shape[:2]
    by0, by1, bx0, bx1 = 0, h, 0, w  # the wanted box, which may reach past the frame
    if cfg.geometry == "crop_pad":
        fg = pixels > cfg.foreground_threshold
        rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
        if rows.size and cols.size:
            margin = int(round(cfg.crop_margin * max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)))
            by0, by1 = rows[0] - margin, rows[-1] + 1 + margin
            bx0, bx1 = cols[0] - margin, cols[-1] + 1 + margin
    crop = (max(0, by0), min(h, by1), max(0, bx0), min(w, bx1))
    # A margin past the frame becomes zero padding, so a head touching the edge of a square image gets the
    # same input as the same head on a wider canvas (otherwise the canvas shape leaks through the margin).
    top, bottom, left, right = crop[0] - by0, by1 - crop[1], crop[2] - bx0, bx1 - crop[3]
    if cfg.geometry != "resize":
        bh, bw = by1 - by0, bx1 - bx0
        side = max(bh, bw)
        sq_top, sq_left = (side - bh) // 2, (side - bw) // 2
        top, bottom = top + sq_top, bottom + side - bh - sq_top
        left, right = left + sq_left, right + side - bw - sq_left
    return Geometry((h, w), tuple(int(v) for v in crop), (int(top), int(bottom), int(left), int(right)), cfg.image_size)


def apply_geometry(pixels: np.ndarray, geom: Geometry, *, nearest: bool = False) -> np.ndarray:
    """Crop, pad with zeros and resize to (size, size). Nearest-neighbour for masks, area-aware bilinear for images."""
    if pixels.shape[:2] != geom.original_shape:
        raise ValueError(f"array of shape {pixels.shape[:2]} does not match geometry for {geom.original_shape}")
    y0, y1, x0, x1 = geom.crop
    top, bottom, left, right = geom.pad
    out = np.pad(pixels[y0:y1, x0:x1], ((top, bottom), (left, right)))
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(out).resize((geom.size, geom.size), resample), dtype=np.uint8)


def invert_geometry(square: np.ndarray, geom: Geometry, *, nearest: bool = False) -> np.ndarray:
    """Map a (size, size) uint8 map (mask or heatmap) back onto the original (H, W) image."""
    y0, y1, x0, x1 = geom.crop
    top, bottom, left, right = geom.pad
    ch, cw = y1 - y0, x1 - x0
    out = np.zeros(geom.original_shape, dtype=square.dtype)
    if nearest:  # Pillow's nearest picks other source pixels with a box; this path is not on the serving side
        restored = np.asarray(Image.fromarray(square).resize((cw + left + right, ch + top + bottom), Image.NEAREST),
                              dtype=square.dtype)
        out[y0:y1, x0:x1] = restored[top : top + ch, left : left + cw]
        return out
    out[y0:y1, x0:x1] = _bilinear_window(square, geom, (0, ch, 0, cw))
    return out


def _bilinear_window(square: np.ndarray, geom: Geometry, window: tuple[int, int, int, int]) -> np.ndarray:
    """Rows ``wy0:wy1`` and columns ``wx0:wx1`` of the crop, bilinearly resampled from the (size, size) map.

    Pillow's ``box`` resamples only that part of the padded square: the same pixels as resizing the whole padded
    square and cutting the window out (within one grey level: Pillow's fixed-point rounding), without allocating
    that square."""
    top, bottom, left, right = geom.pad
    y0, y1, x0, x1 = geom.crop
    sy, sx = square.shape[0] / (y1 - y0 + top + bottom), square.shape[1] / (x1 - x0 + left + right)
    wy0, wy1, wx0, wx1 = window
    box = ((left + wx0) * sx, (top + wy0) * sy, (left + wx1) * sx, (top + wy1) * sy)
    return np.asarray(Image.fromarray(square).resize((wx1 - wx0, wy1 - wy0), Image.BILINEAR, box=box),
                      dtype=square.dtype)


def _reach(hot: np.ndarray, scale: float, pad: int, length: int) -> tuple[int, int]:
    """The crop rows (or columns) ``[a, b)`` whose bilinear resampling reads any of the source rows ``hot`` (sorted):
    an output centre reads source rows within ``max(1, scale)`` of it (Pillow's bilinear support); 2 rows spare."""
    support = max(1.0, scale)
    a = math.floor((hot[0] - support - 0.5) / scale - 0.5) - 2 - pad
    b = math.ceil((hot[-1] + support + 0.5) / scale - 0.5) + 3 - pad
    return max(0, a), min(length, b)


def mask_to_original(mask_prob: np.ndarray, geometry: Geometry, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """(size, size) mask probabilities -> (H, W) uint8 0/1 mask on the original image: the one rule serving answers
    with and evaluation scores at the original resolution. Probabilities are resized bilinearly and then
    thresholded, so an enlarged mask has smooth edges rather than model-pixel blocks.

    Resized as uint8 levels (probability x 255), not float32: the full-size intermediate is 1 byte a pixel, and the
    threshold becomes a level (0.5 -> 128); edges may move by one level's worth of interpolation. Only the window
    around the source pixels at or above the level is resampled: bilinear weights are positive and sum to one, so
    every other pixel stays under the level (an empty mask costs no resize at all)."""
    if mask_prob.shape != (geometry.size, geometry.size):
        raise ValueError(f"mask_prob of shape {mask_prob.shape} does not match the model input size {geometry.size}")
    levels = np.clip(np.rint(np.asarray(mask_prob, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    level = np.uint8(min(255, max(1, int(np.ceil(threshold * 255.0 - 1e-6)))))
    out = np.zeros(geometry.original_shape, dtype=np.uint8)
    hot = levels >= level
    rows, cols = np.flatnonzero(hot.any(axis=1)), np.flatnonzero(hot.any(axis=0))
    if not rows.size:
        return out
    y0, y1, x0, x1 = geometry.crop
    top, bottom, left, right = geometry.pad
    wy0, wy1 = _reach(rows, geometry.size / (y1 - y0 + top + bottom), top, y1 - y0)
    wx0, wx1 = _reach(cols, geometry.size / (x1 - x0 + left + right), left, x1 - x0)
    if wy0 < wy1 and wx0 < wx1:
        window = _bilinear_window(levels, geometry, (wy0, wy1, wx0, wx1))
        out[y0 + wy0 : y0 + wy1, x0 + wx0 : x0 + wx1] = window >= level
    return out


def preprocess(pixels: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, Geometry]:
    """Greyscale uint8 (H, W) -> model input uint8 (size, size) and the geometry to undo it."""
    geom = compute_geometry(pixels, cfg)
    return apply_geometry(pixels, geom), geom


def preprocess_mask(mask: np.ndarray, geom: Geometry) -> np.ndarray:
    """Binary (H, W) mask -> binary (size, size) mask through the image's own geometry."""
    return apply_geometry(mask.astype(np.uint8), geom, nearest=True)


def normalize(batch_uint8: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """The normalisation the model graph applies, for numpy consumers (e.g. reference checks)."""
    return (batch_uint8.astype(np.float32) - cfg.mean) / cfg.std

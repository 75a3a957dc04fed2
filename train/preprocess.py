"""The one image contract, torch-free: decode -> greyscale -> square geometry -> uint8.

Training, evaluation, export and serving all call these functions with a :class:`PreprocessConfig`
that is saved inside every checkpoint and exported model, so the pixels a model sees never drift.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# The size budget, checked on the header before any pixel is decoded. The longest side bounds every array a request
# allocates (the padded square of crop_pad is at most ~1.1 x MAX_SIDE on a side), so a 613-byte 20000x20 PNG is
# refused instead of costing gigabytes. BRISC's largest slice is 1427 px; MRI slices are rarely over 1024.
MAX_SIDE = 2048
MAX_PIXELS = MAX_SIDE * MAX_SIDE
MIN_SIDE = 8
# The formats documented and tested; Pillow would open many more (GIF, TIFF, EPS through Ghostscript, ...).
FORMATS = ("JPEG", "PNG")
GEOMETRIES = ("crop_pad", "pad", "resize")


class ImageDecodeError(ValueError):
    """The bytes are not an image we can read; the message says why and what is accepted."""


class UnsupportedFormatError(ImageDecodeError):
    """An image in a format other than JPEG, PNG or DICOM (serving answers 415)."""


def check_size(width: int, height: int, name: str = "image") -> None:
    """Refuse an image outside the size budget (:data:`MAX_SIDE`, :data:`MAX_PIXELS`, :data:`MIN_SIDE`)."""
    if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE:
        raise ImageDecodeError(f"{name}: image is too large ({width}x{height}); at most {MAX_SIDE} pixels on a side "
                               f"and {MAX_PIXELS} pixels in all (a brain MRI slice is usually under 1024x1024)")
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageDecodeError(f"{name}: image is {width}x{height}; at least {MIN_SIDE}x{MIN_SIDE} pixels needed")


def _format_name(data: bytes) -> str | None:
    """The format another Pillow plugin recognises from the first 16 bytes (its ``accept`` check; nothing is
    opened or decoded), for the refusal's message."""
    Image.init()
    prefix = data[:16]
    for fmt, (_, accept) in Image.OPEN.items():
        if fmt not in FORMATS and accept is not None and accept(prefix):
            return fmt
    return None


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
class DecodedImage:
    pixels: np.ndarray  # (H, W) uint8 greyscale
    mode: str  # Pillow mode of the file
    is_colour: bool  # RGB whose channels differ (a photo, not an MRI slice)


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


def decode_image(source: bytes | str | Path) -> DecodedImage:
    """Decode JPEG/PNG/DICOM bytes or a file to greyscale uint8. Raises ImageDecodeError, never returns zeros.

    DICOM goes to :mod:`.dicom` (windowing, MONOCHROME1); use ``dicom.decode_any`` to also get its pixel spacing.
    """
    name = str(source) if isinstance(source, (str, Path)) else "image bytes"
    try:
        data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    except OSError as exc:
        raise ImageDecodeError(f"{name}: cannot read file ({exc.strerror or exc})") from exc
    if not data:
        raise ImageDecodeError(f"{name}: empty file; send a JPEG, PNG or DICOM slice")
    from . import dicom  # imported here: dicom builds on this module

    if dicom.is_dicom(data):
        return dicom.decode_dicom(data, name)[0]
    try:
        # Only the JPEG and PNG plugins are tried: other formats never reach a decoder (EPS would run Ghostscript).
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            # Checked on the header, before any pixel is decoded; an explicit check rather than swapping Pillow's
            # global MAX_IMAGE_PIXELS, which would race between the serving threads.
            check_size(img.width, img.height, name)
            img.load()
            mode = img.mode
            pixels, is_colour = _to_grey(img)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{name}: image is too large ({exc}); at most {MAX_PIXELS} pixels") from exc
    except Image.UnidentifiedImageError as exc:
        found = _format_name(data)
        if found is not None:
            raise UnsupportedFormatError(f"{name}: {found} images are not accepted; send a JPEG, PNG or DICOM "
                                         "slice") from exc
        raise ImageDecodeError(f"{name}: not a readable image; send a JPEG, PNG or DICOM slice") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{name}: corrupt or truncated image ({exc}); re-export the slice") from exc
    check_size(pixels.shape[1], pixels.shape[0], name)  # EXIF rotation may have swapped the sides
    return DecodedImage(pixels, mode, is_colour)


def _to_grey(img: Image.Image) -> tuple[np.ndarray, bool]:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.array(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        # In place: one float64 copy of the image, not three (the same arithmetic as (arr - lo) * k).
        arr -= lo
        arr *= 255.0 / (hi - lo) if hi > lo else 0.0
        return np.clip(np.rint(arr, out=arr), 0, 255, out=arr).astype(np.uint8), False
    if img.mode == "L":
        return np.asarray(img, dtype=np.uint8).copy(), False
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    r, g, b = rgb[..., 0].astype(np.int16), rgb[..., 1].astype(np.int16), rgb[..., 2].astype(np.int16)
    # JPEG chroma noise makes "equal" channels differ by a few levels; a photo differs by far more.
    spread = max(np.abs(r - g).mean(), np.abs(g - b).mean())
    if spread <= 2.0:
        return rgb[..., 0].copy(), False
    return np.asarray(img.convert("L"), dtype=np.uint8).copy(), True


def decode_mask(source: bytes | str | Path, threshold: int = 128) -> np.ndarray:
    """Decode a soft-edged mask and binarise it at ``threshold`` (values >= threshold are tumour)."""
    pixels = decode_image(source).pixels
    return (pixels >= threshold).astype(np.uint8)


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
    full_h, full_w = ch + top + bottom, cw + left + right
    out = np.zeros(geom.original_shape, dtype=square.dtype)
    if nearest:  # Pillow's nearest picks other source pixels with a box; this path is not on the serving side
        restored = np.asarray(Image.fromarray(square).resize((full_w, full_h), Image.NEAREST), dtype=square.dtype)
        out[y0:y1, x0:x1] = restored[top : top + ch, left : left + cw]
        return out
    # Bilinear: resample only the crop's part of the square (Pillow's ``box``), the same pixels as resizing the whole
    # padded square and cutting the crop out (within one grey level: Pillow's fixed-point rounding), without
    # allocating that square.
    sy, sx = square.shape[0] / full_h, square.shape[1] / full_w
    box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    out[y0:y1, x0:x1] = np.asarray(Image.fromarray(square).resize((cw, ch), Image.BILINEAR, box=box),
                                   dtype=square.dtype)
    return out


def mask_to_original(mask_prob: np.ndarray, geometry: Geometry, threshold: float = 0.5) -> np.ndarray:
    """(size, size) mask probabilities -> (H, W) uint8 0/1 mask on the original image: the one rule serving answers
    with and evaluation scores at the original resolution. Probabilities are resized bilinearly and then
    thresholded, so an enlarged mask has smooth edges rather than model-pixel blocks.

    Resized as uint8 levels (probability x 255), not float32: the full-size intermediate is 1 byte a pixel, and the
    threshold becomes a level (0.5 -> 128); edges may move by one level's worth of interpolation."""
    if mask_prob.shape != (geometry.size, geometry.size):
        raise ValueError(f"mask of shape {mask_prob.shape} does not match the model input "
                         f"({geometry.size}x{geometry.size})")
    levels = np.clip(np.rint(np.asarray(mask_prob, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    restored = invert_geometry(levels, geometry)
    level = np.uint8(min(255, max(1, int(np.ceil(threshold * 255.0 - 1e-6)))))
    return (restored >= level).view(np.uint8)


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

"""What every decoder of :mod:`.decode` shares: the size budget, the error types, the decoded image and the
greyscale rules (JPEG/PNG and DICOM colour frames), min-max scaling. Torch-free, imports nothing of ours; split out
of decode.py so that the JPEG/PNG entry points (decode.py) and DICOM (decode_dicom.py) both build on it without
importing each other in a circle."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

# The size budget, checked on the header before any pixel is decoded. The longest side bounds every array a request
# allocates (the padded square of crop_pad is at most ~1.1 x MAX_SIDE on a side), so a 613-byte 20000x20 PNG is
# refused instead of costing gigabytes. BRISC's largest slice is 1427 px; MRI slices are rarely over 1024.
MAX_SIDE = 2048
MAX_PIXELS = MAX_SIDE * MAX_SIDE
MIN_SIDE = 8


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


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (H, W) uint8 greyscale
    mode: str  # Pillow mode of the file
    is_colour: bool  # RGB whose channels differ (a photo, not an MRI slice)


def _equal_channels(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> bool:
    """A grey slice stored as RGB, not a colour photo: the one rule both decoders apply."""
    # JPEG chroma noise makes "equal" channels differ by a few levels; a photo differs by far more. The mean absolute
    # channel difference, through OpenCV's L1 norm (about 3x faster than numpy's int16 copies on a 512 px slice).
    return max(cv2.norm(r, g, cv2.NORM_L1), cv2.norm(g, b, cv2.NORM_L1)) / r.size <= 2.0


def _to_grey(img: Image.Image) -> tuple[np.ndarray, bool]:
    """A loaded image's greyscale pixels and whether it is a colour photo, as stored (:func:`upright` turns them)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _min_max(np.array(img, dtype=np.float64)), False
    if img.mode == "L":
        return np.array(img, dtype=np.uint8), False
    rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    r, g, b = cv2.split(rgb)
    if _equal_channels(r, g, b):
        return r, False
    return np.array(img.convert("L"), dtype=np.uint8), True


def _min_max(x: np.ndarray) -> np.ndarray:
    """Linear min-max scaling of a float64 array the caller owns (scaled in place: one copy of the image, not three)
    to uint8 0..255: 16-bit PNGs and DICOM without a window. A constant image becomes all 0."""
    lo, hi = float(x.min()), float(x.max())
    x -= lo
    x *= 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip(np.rint(x, out=x), 0, 255, out=x).astype(np.uint8)

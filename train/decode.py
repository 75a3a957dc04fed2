"""Decoding, the one leaf every layer reads pixels through: JPEG, PNG or DICOM bytes -> :class:`DecodedImage`
(greyscale uint8) + :class:`DicomInfo` for DICOM. Torch-free (Pillow, OpenCV, pydicom, numpy); the three modules
decode.py (entry points, JPEG/PNG), decode_dicom.py and decode_common.py (size budget, errors, greyscale rules) import
nothing else of ours.

Training (the cache, the audit), export (parity data), evaluation and serving all call :func:`decode_any` /
:func:`decode_image`; the geometry that turns a decoded slice into model input is :mod:`.preprocess`.

DICOM: only pixel, geometry and photometric tags are read (``specific_tags``): patient name, IDs and dates are
skipped unparsed, so neither pydicom's warnings nor our errors and results can carry them.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import cv2
import numpy as np
from PIL import ExifTags, Image

from .decode_common import (MAX_PIXELS, MAX_SIDE, MIN_SIDE, DecodedImage, ImageDecodeError, UnsupportedFormatError,
                            _equal_channels, _min_max, _to_grey, check_size)
from .decode_dicom import ACCEPTED, COLOUR, MONOCHROME, DicomInfo, decode_dicom, is_dicom

__all__ = ["ACCEPTED", "COLOUR", "FORMATS", "MAX_PIXELS", "MAX_SIDE", "MIN_SIDE", "MONOCHROME", "DecodedImage",
           "DicomInfo", "ImageDecodeError", "UnsupportedFormatError", "check_size", "decode_any", "decode_dicom",
           "decode_image", "decode_mask", "is_dicom", "upright", "_equal_channels", "_min_max", "_to_grey"]

# The formats documented and tested; Pillow would open many more (GIF, TIFF, EPS through Ghostscript, ...).
FORMATS = ("JPEG", "PNG")


def _format_name(data: bytes) -> str | None:
    """The format another Pillow plugin recognises from the first 16 bytes (its ``accept`` check; nothing is
    opened or decoded), for the refusal's message."""
    Image.init()
    prefix = data[:16]
    for fmt, (_, accept) in Image.OPEN.items():
        if fmt in FORMATS or accept is None:
            continue
        try:
            if accept(prefix):
                return fmt
        except (SyntaxError, IndexError, TypeError, struct.error):
            # a plugin's check that reads past a short prefix (BMP's needs 4 bytes); Pillow's own open() treats
            # these the same way: not that format
            continue
    return None


# -- the entry points ---------------------------------------------------------------------------------------------

def decode_any(source: bytes | str | Path) -> tuple[DecodedImage, DicomInfo | None]:
    """Decode JPEG, PNG or DICOM bytes or a file to greyscale uint8, sniffing for DICOM once; the DicomInfo (pixel
    spacing, modality...) comes back for DICOM, else None. Raises ImageDecodeError, never returns zeros."""
    name = str(source) if isinstance(source, (str, Path)) else "image bytes"
    try:
        data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    except OSError as exc:
        raise ImageDecodeError(f"{name}: cannot read file ({exc.strerror or exc})") from exc
    if not data:
        raise ImageDecodeError(f"{name}: empty file; send a JPEG, PNG or DICOM slice")
    if is_dicom(data):
        return decode_dicom(data, name if isinstance(source, (str, Path)) else "DICOM")
    return _decode_raster(data, name), None


def decode_image(source: bytes | str | Path) -> DecodedImage:
    """The pixels of :func:`decode_any` (training, audit and export need no DICOM metadata)."""
    return decode_any(source)[0]


def decode_mask(source: bytes | str | Path, threshold: int = 128) -> np.ndarray:
    """Decode a soft-edged mask and binarise it at ``threshold`` (values >= threshold are tumour)."""
    pixels = decode_image(source).pixels
    return (pixels >= threshold).astype(np.uint8)


# -- JPEG and PNG --------------------------------------------------------------------------------------------------

def _decode_raster(data: bytes, name: str) -> DecodedImage:
    """JPEG or PNG bytes to greyscale uint8 (the caller has ruled out DICOM)."""
    try:
        # Only the JPEG and PNG plugins are tried: other formats never reach a decoder (EPS would run Ghostscript).
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            # Checked on the header, before any pixel is decoded; an explicit check rather than swapping Pillow's
            # global MAX_IMAGE_PIXELS, which would race between the serving threads.
            check_size(img.width, img.height, name)
            mode = img.mode
            fast = _jpeg_grey(data, img)
            if fast is None:
                img.load()
            pixels, is_colour = fast or _to_grey(img)
            pixels = upright(pixels, img)
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


# Pillow's ImageOps.exif_transpose for each EXIF orientation, as numpy index operations (exact pixel moves).
_ORIENT = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.T,  # TRANSPOSE
    6: lambda a: np.rot90(a, -1),  # ROTATE_270 (counter-clockwise)
    7: lambda a: a[::-1, ::-1].T,  # TRANSVERSE
    8: lambda a: np.rot90(a, 1),  # ROTATE_90
}
_JPEG_EOI = b"\xff\xd9"


def upright(pixels: np.ndarray, img: Image.Image) -> np.ndarray:
    """``img``'s (H, W) pixels turned as its EXIF orientation says, as Pillow's ``exif_transpose`` turns them (tests
    compare the two); unrotated pixels are returned as they are. Per-pixel conversions commute with these moves, so
    both decoders apply it last."""
    turn = _ORIENT.get(img.getexif().get(ExifTags.Base.Orientation, 1))
    return pixels if turn is None else np.ascontiguousarray(turn(pixels))


def _jpeg_grey(data: bytes, img: Image.Image) -> tuple[np.ndarray, bool] | None:
    """A complete 8-bit greyscale or RGB JPEG decoded by OpenCV: the same libjpeg-turbo, the same pixels as Pillow
    (every BRISC JPEG compared: tests/unit/test_decode_jpeg.py), in about half the time, since Pillow decodes RGB into
    4-byte pixels that numpy then copies. None sends the image down Pillow's path: another mode, a real colour photo
    (Pillow's luma rounding), or a file that does not end in an EOI marker (libjpeg would fill a truncated file with
    grey and only warn; Pillow refuses it)."""
    if img.format != "JPEG" or img.mode not in ("L", "RGB") or not data.endswith(_JPEG_EOI):
        return None
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    want = (img.height, img.width) if img.mode == "L" else (img.height, img.width, 3)
    if pixels is None or pixels.shape != want or pixels.dtype != np.uint8:
        return None
    if pixels.ndim == 3:
        b, g, r = cv2.split(pixels)
        if not _equal_channels(r, g, b):
            return None
        pixels = r
    return pixels, False

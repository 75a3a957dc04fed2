"""Decoding, the one leaf every layer reads pixels through: JPEG, PNG or DICOM bytes -> :class:`DecodedImage`
(greyscale uint8) + :class:`DicomInfo` for DICOM. Torch-free (Pillow, OpenCV, pydicom, numpy); imports nothing of ours.

Training (the cache, the audit), export (parity data), evaluation and serving all call :func:`decode_any` /
:func:`decode_image`; the geometry that turns a decoded slice into model input is :mod:`.preprocess`.

DICOM: only pixel, geometry and photometric tags are read (``specific_tags``): patient name, IDs and dates are
skipped unparsed, so neither pydicom's warnings nor our errors and results can carry them.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import ExifTags, Image

# The size budget, checked on the header before any pixel is decoded. The longest side bounds every array a request
# allocates (the padded square of crop_pad is at most ~1.1 x MAX_SIDE on a side), so a 613-byte 20000x20 PNG is
# refused instead of costing gigabytes. BRISC's largest slice is 1427 px; MRI slices are rarely over 1024.
MAX_SIDE = 2048
MAX_PIXELS = MAX_SIDE * MAX_SIDE
MIN_SIDE = 8
# The formats documented and tested; Pillow would open many more (GIF, TIFF, EPS through Ghostscript, ...).
FORMATS = ("JPEG", "PNG")


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


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (H, W) uint8 greyscale
    mode: str  # Pillow mode of the file
    is_colour: bool  # RGB whose channels differ (a photo, not an MRI slice)


@dataclass(frozen=True)
class DicomInfo:
    """What a DICOM header says about the decoded frame; geometry and photometric fields only, never PHI."""

    photometric_interpretation: str
    pixel_spacing_mm: tuple[float, float] | None  # (row spacing, column spacing): mm between rows, between columns
    modality: str | None  # "MR", "CT", ... (an MRI model should refer anything else)
    rows: int
    columns: int
    number_of_frames: int
    frame_index: int  # the frame that was decoded: the middle one of a multi-frame object
    bits_stored: int
    rescale: tuple[float, float]  # (slope, intercept) applied before windowing
    window: tuple[float, float] | None  # (center, width) applied; None when min-max scaling was used
    transfer_syntax: str


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


# -- DICOM ---------------------------------------------------------------------------------------------------------

_MAGIC_OFFSET = 128
_MAGIC = b"DICM"
# Without the 128-byte preamble a dataset starts with a little-endian tag of group 0x0002 (file meta) or
# 0x0008 (identification); anything else is not worth handing to pydicom's forced parser.
_BARE_GROUPS = (b"\x02\x00", b"\x08\x00")
_VR_NAMES = "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV"
_VRS = frozenset(vr.encode() for vr in _VR_NAMES.split())

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# pydicom returns YBR_FULL/YBR_FULL_422 as RGB; JPEG 2000 decoders return YBR_ICT/YBR_RCT as RGB.
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
ACCEPTED = "a DICOM image with PixelData (MONOCHROME1, MONOCHROME2 or RGB), or a JPEG or PNG slice"

# The only tags read. Enhanced (multi-frame) objects keep spacing, rescale and window in functional groups.
_TAGS = [
    "SpecificCharacterSet", "Modality", "SOPClassUID",
    "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "NumberOfFrames",
    "PixelSpacing", "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "WindowCenter", "WindowWidth", "VOILUTFunction",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
    "PixelData",
]


def is_dicom(data: bytes) -> bool:
    """True for a DICOM Part 10 file (``DICM`` at offset 128) or a bare dataset pydicom reads as an image object."""
    if data[_MAGIC_OFFSET : _MAGIC_OFFSET + 4] == _MAGIC:
        return True
    if not _plausible_first_element(data):
        return False
    import pydicom

    try:
        probe = ["SOPClassUID", "Modality", "Rows", "Columns"]
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True, specific_tags=probe)
    except Exception:  # noqa: BLE001 - forced parsing of arbitrary bytes can fail in any way; it just isn't DICOM
        return False
    # "Clearly DICOM": an identification element plus image dimensions, not a lucky parse of two bytes.
    return ("SOPClassUID" in ds or "Modality" in ds) and "Rows" in ds and "Columns" in ds


def _plausible_first_element(data: bytes) -> bool:
    """A bare dataset's first element: group 0002/0008, then an explicit VR or an implicit length that fits."""
    if len(data) < 8 or data[:2] not in _BARE_GROUPS:
        return False
    if data[4:6] in _VRS:
        return True
    length = int.from_bytes(data[4:8], "little")
    return length < len(data) - 8


# What a forced parse of untrusted bytes, and reading the values of what it parsed, can raise: a header whose values
# are not what the standard says (a multi-valued UID, a bad length, an unknown VR) is the sender's fault, never a 500.
# tests/unit/test_decode_fuzz.py found each of these.
_HEADER_FAULTS = (EOFError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, NotImplementedError,
                  OverflowError, struct.error)


def decode_dicom(data: bytes, name: str = "DICOM") -> tuple[DecodedImage, DicomInfo]:
    """Decode one DICOM slice to greyscale uint8, the way a viewer displays it (see :func:`_decode_dicom`).
    Raises ImageDecodeError saying what is wrong and what is accepted, whatever the bytes are."""
    from pydicom.errors import BytesLengthException, InvalidDicomError

    try:
        return _decode_dicom(data, name)
    except ImageDecodeError:
        raise
    except (InvalidDicomError, BytesLengthException, *_HEADER_FAULTS) as exc:
        reason = type(exc).__name__  # not the message: a header parse error could quote a value
        raise ImageDecodeError(f"{name}: corrupt DICOM header ({reason}); send {ACCEPTED}") from exc


def _decode_dicom(data: bytes, name: str) -> tuple[DecodedImage, DicomInfo]:
    """Decode one DICOM slice to greyscale uint8, the way a viewer displays it.

    Modality LUT (RescaleSlope/RescaleIntercept, or a Modality LUT Sequence), then the first VOI window
    (WindowCenter/WindowWidth, LINEAR, LINEAR_EXACT or SIGMOID); without a window, 8-bit unscaled values are
    kept as they are (like the same slice saved as PNG) and anything else is min-max scaled; then
    MONOCHROME1 inversion so that dense tissue is bright, as in MONOCHROME2. A multi-frame object gives
    its middle frame (``DicomInfo.frame_index`` says which), the slice a reader would look at first.
    Raises ImageDecodeError saying what is wrong and what is accepted.
    """
    import pydicom
    from pydicom.errors import BytesLengthException, InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, specific_tags=_TAGS)
        # pydicom converts element values lazily, on first access: convert every element read now, so that a value
        # it cannot parse (an unknown VR, a bad length) is refused here as a corrupt header, not later as a 500
        for dataset in (getattr(ds, "file_meta", None) or (), ds):
            for _ in dataset:
                pass
    except (InvalidDicomError, BytesLengthException, *_HEADER_FAULTS) as exc:
        reason = type(exc).__name__  # not the message: a header parse error could quote a value
        raise ImageDecodeError(f"{name}: corrupt or truncated DICOM header ({reason}); send {ACCEPTED}") from exc
    _assume_transfer_syntax(ds)
    syntax = _transfer_syntax(ds)
    if "PixelData" not in ds:
        raise ImageDecodeError(
            f"{name}: DICOM file has no PixelData (a report, presentation state or header-only object); send {ACCEPTED}"
        )
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in MONOCHROME + COLOUR:
        raise ImageDecodeError(
            f"{name}: DICOM photometric interpretation {photometric or 'missing'!r} is not supported; send {ACCEPTED}"
        )
    rows, cols = _int(ds.get("Rows"), 0), _int(ds.get("Columns"), 0)
    check_size(cols, rows, name)
    frames = max(1, _int(ds.get("NumberOfFrames"), 1))
    index = frames // 2
    try:
        arr = pydicom.pixels.pixel_array(ds, index=index)
    except (NotImplementedError, RuntimeError) as exc:
        if not _decoder_available(ds):
            raise ImageDecodeError(
                f"{name}: no decoder here for DICOM transfer syntax {syntax}; send an uncompressed, RLE, "
                f"JPEG baseline or JPEG 2000 DICOM, or a JPEG or PNG slice"
            ) from exc
        raise ImageDecodeError(f"{name}: corrupt {syntax} pixel data ({exc}); re-export the slice") from exc
    except (ValueError, AttributeError, KeyError, TypeError, EOFError) as exc:
        raise ImageDecodeError(f"{name}: corrupt or truncated DICOM pixel data ({exc}); re-export the slice") from exc

    if photometric in MONOCHROME:
        if arr.ndim != 2:
            raise ImageDecodeError(f"{name}: {photometric} pixel data has shape {arr.shape}, expected one 2-D frame")
        values, rescale = _modality(arr, ds, index)
        window = _window(ds, index)
        if window is not None:
            pixels = _apply_window(values, *window, _voi_function(ds, index))
        elif arr.dtype == np.uint8 and rescale == (1.0, 0.0):
            pixels = arr.copy()  # 8-bit, no window: already display levels, as the same slice saved as PNG
        else:
            pixels = _min_max(values)
        if photometric == "MONOCHROME1":  # minimum value is white in MONOCHROME1
            pixels = 255 - pixels
        mode = "L" if int(ds.get("BitsAllocated") or 8) <= 8 else "I;16"
        decoded = DecodedImage(pixels, mode, False)
    else:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ImageDecodeError(f"{name}: {photometric} pixel data has shape {arr.shape}; expected (rows, cols, 3)")
        rgb = arr if arr.dtype == np.uint8 else _min_max(arr.astype(np.float64))
        grey, is_colour = _to_grey(Image.fromarray(np.ascontiguousarray(rgb)))
        rescale, window = (1.0, 0.0), None
        decoded = DecodedImage(grey, "RGB", is_colour)

    info = DicomInfo(
        photometric_interpretation=photometric,
        pixel_spacing_mm=_spacing(ds, index),
        modality=(str(ds.Modality).strip().upper() or None) if "Modality" in ds else None,
        rows=rows,
        columns=cols,
        number_of_frames=frames,
        frame_index=index,
        bits_stored=_int(ds.get("BitsStored"), 8),
        rescale=rescale,
        window=window,
        transfer_syntax=syntax,
    )
    return decoded, info


def _assume_transfer_syntax(ds) -> None:
    """A bare dataset has no file meta; its pixels are decodable in the encoding pydicom found while reading."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if implicit is None:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )


def _decoder_available(ds) -> bool:
    from pydicom.pixels import get_decoder

    try:
        return get_decoder(ds.file_meta.TransferSyntaxUID).is_available
    except (AttributeError, NotImplementedError, ValueError):
        return False


def _transfer_syntax(ds) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return uid.name if uid is not None else "unknown (no file meta)"


def _frame_value(ds, frame: int, group: str, keyword: str):
    """A frame's value of ``keyword``: per-frame functional group, then shared group, then the top level."""
    for seq_keyword, item in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(seq_keyword)
        if seq is not None and len(seq) > item:
            macro = seq[item].get(group)
            if macro is not None and len(macro) and keyword in macro[0]:
                return macro[0][keyword].value
    return ds[keyword].value if keyword in ds else None


def _first(value) -> float | None:
    """First value of a possibly multi-valued numeric element, None when empty or not finite."""
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if not len(value):
            return None
        value = value[0]
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _modality(arr: np.ndarray, ds, frame: int) -> tuple[np.ndarray, tuple[float, float]]:
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return apply_modality_lut(arr, ds).astype(np.float64), (1.0, 0.0)
    slope = _first(_frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _first(_frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept"))
    slope = 1.0 if slope is None or slope == 0 else slope
    intercept = 0.0 if intercept is None else intercept
    return arr.astype(np.float64) * slope + intercept, (slope, intercept)


def _window(ds, frame: int) -> tuple[float, float] | None:
    center = _first(_frame_value(ds, frame, "FrameVOILUTSequence", "WindowCenter"))
    width = _first(_frame_value(ds, frame, "FrameVOILUTSequence", "WindowWidth"))
    if center is None or width is None or width < 1:  # width < 1 is invalid for LINEAR (PS3.3 C.11.2.1.2)
        return None
    return center, width


def _voi_function(ds, frame: int) -> str:
    value = _frame_value(ds, frame, "FrameVOILUTSequence", "VOILUTFunction")
    return str(value).strip().upper() if value else "LINEAR"


def _apply_window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI window to 0..255 (DICOM PS3.3 C.11.2.1.2, output range 0..255)."""
    if function == "SIGMOID":
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = ((x - center) / width + 0.5) * 255.0
    elif width == 1:  # LINEAR with width 1 is a step at center - 0.5
        y = np.where(x > center - 0.5, 255.0, 0.0)
    else:
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def _min_max(x: np.ndarray) -> np.ndarray:
    """Linear min-max scaling of a float64 array the caller owns (scaled in place: one copy of the image, not three)
    to uint8 0..255: 16-bit PNGs and DICOM without a window. A constant image becomes all 0."""
    lo, hi = float(x.min()), float(x.max())
    x -= lo
    x *= 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip(np.rint(x, out=x), 0, 255, out=x).astype(np.uint8)


def _spacing(ds, frame: int) -> tuple[float, float] | None:
    value = _frame_value(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(row) and math.isfinite(col) and row > 0 and col > 0):
        return None
    return row, col

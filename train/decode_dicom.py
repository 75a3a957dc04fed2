"""DICOM decoding for :mod:`.decode`: bytes -> :class:`DecodedImage` (greyscale uint8) + :class:`DicomInfo`.
Torch-free (pydicom and its pixel-data plugins, numpy); imports nothing of ours but the shared decode_common.

Only pixel, geometry and photometric tags are read (``specific_tags``): patient name, IDs and dates are skipped
unparsed, so neither pydicom's warnings nor our errors and results can carry them. Compressed pixel data is decoded by
pydicom's plugins: python-gdcm (JPEG Lossless, JPEG-LS, JPEG 2000, 8-bit JPEG), pylibjpeg-libjpeg (12-bit JPEG
Extended, which pydicom's GDCM plugin refuses), pyjpegls (JPEG-LS), Pillow, pydicom's own RLE; all in the serve extra
(:data:`DECODERS` names them in the refusal when one is missing).
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .decode_common import DecodedImage, ImageDecodeError, _min_max, _to_grey, check_size

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
        if not _decoder_available(ds) or _only_unsupported(exc):
            raise ImageDecodeError(f"{name}: {no_decoder_message(ds, syntax)}") from exc
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


# The pydicom pixel-data plugins (PyPI packages, all in the serve extra) that decode each compressed transfer syntax;
# the refusal names them when none is installed (or none supports this file's bit depth).
_GDCM, _LIBJPEG, _JPEGLS = "python-gdcm", "pylibjpeg + pylibjpeg-libjpeg", "pyjpegls"
DECODERS = {
    "1.2.840.10008.1.2.4.50": (_GDCM, "Pillow"),  # JPEG Baseline 8-bit
    "1.2.840.10008.1.2.4.51": (_LIBJPEG,),  # JPEG Extended 12-bit: pydicom's GDCM and Pillow plugins refuse 12-bit
    "1.2.840.10008.1.2.4.57": (_GDCM, _LIBJPEG),  # JPEG Lossless, process 14
    "1.2.840.10008.1.2.4.70": (_GDCM, _LIBJPEG),  # JPEG Lossless, process 14 selection value 1
    "1.2.840.10008.1.2.4.80": (_GDCM, _JPEGLS, _LIBJPEG),  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": (_GDCM, _JPEGLS, _LIBJPEG),  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": (_GDCM, "pylibjpeg + pylibjpeg-openjpeg", "Pillow"),  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": (_GDCM, "pylibjpeg + pylibjpeg-openjpeg", "Pillow"),  # JPEG 2000
    "1.2.840.10008.1.2.4.201": ("pylibjpeg + pylibjpeg-openjpeg",),  # High-Throughput JPEG 2000 lossless
    "1.2.840.10008.1.2.4.202": ("pylibjpeg + pylibjpeg-openjpeg",),  # HTJ2K lossless, RPCL
    "1.2.840.10008.1.2.4.203": ("pylibjpeg + pylibjpeg-openjpeg",),  # HTJ2K
    "1.2.840.10008.1.2.5": ("pydicom (built in)", _GDCM),  # RLE Lossless
}


def no_decoder_message(ds, syntax: str) -> str:
    """The refusal for pixel data no installed plugin decodes: the syntax, the decoders that would, how to get them."""
    uid = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    packages = DECODERS.get(uid)
    if packages is None:
        return (f"no decoder here for DICOM transfer syntax {syntax} ({uid or 'no UID'}): no pixel-data plugin of "
                "pydicom decodes it; send an uncompressed, RLE, JPEG, JPEG-LS or JPEG 2000 DICOM, or a JPEG or PNG "
                "slice")
    bits = _int(ds.get("BitsStored"), 0)
    return (f"no decoder here for DICOM transfer syntax {syntax} ({uid}, {bits}-bit): it needs one of "
            f"{', '.join(packages)}, none of which is installed here or supports this file (the serve extra "
            f"brings python-gdcm, pylibjpeg-libjpeg and pyjpegls); or send the slice uncompressed")


def _only_unsupported(exc: Exception) -> bool:
    """pydicom's "every plugin failed" error where each plugin only said it does not support this file (e.g. GDCM and
    Pillow with 12-bit JPEG Extended): a missing decoder, not corrupt data."""
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    return bool(lines) and all("does not support" in line or "not installed" in line for line in lines)


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


def _spacing(ds, frame: int) -> tuple[float, float] | None:
    value = _frame_value(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(row) and math.isfinite(col) and row > 0 and col > 0):
        return None
    return row, col

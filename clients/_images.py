"""What the SDK sends for an image: the bytes of a file as they are, or a numpy array encoded losslessly as PNG.

The server decodes JPEG, PNG and DICOM itself; nothing here decodes or resizes, so what the server sees is what
the caller has.
"""

from __future__ import annotations

import errno
import io
import os
from typing import Union

import numpy as np

Image = Union[str, os.PathLike, bytes, np.ndarray]

ARRAY_HELP = ("an image array must be 2-D (H, W) of uint8 or uint16, or (H, W, 1) of uint8/uint16, or (H, W, 3) "
              "of uint8 (RGB)")


def image_bytes(image: Image) -> bytes:
    """The bytes to send for ``image``: a path's file content, bytes as given, an array as a PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ValueError("the image is empty (0 bytes); pass the bytes of a JPEG, PNG or DICOM file")
        return data
    if isinstance(image, np.ndarray):
        return array_png(image)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "image file not found", path) from None
    raise TypeError(f"unsupported image type {type(image).__name__}; pass a file path, the file's bytes or a "
                    "numpy array")


def array_png(array: np.ndarray) -> bytes:
    """``array`` as a lossless PNG: 8- or 16-bit greyscale, or 8-bit RGB."""
    from PIL import Image as PILImage

    if array.dtype.kind == "u" and not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))  # big-endian DICOM-style pixels
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    grey = array.ndim == 2 and array.dtype in (np.uint8, np.uint16)
    rgb = array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8
    if not (grey or rgb):
        raise ValueError(f"{ARRAY_HELP}; got shape {array.shape} of {array.dtype}")
    if array.size == 0:
        raise ValueError(f"the image array is empty (shape {array.shape}); {ARRAY_HELP}")
    picture = PILImage.fromarray(np.ascontiguousarray(array))  # uint16 -> mode I;16, saved as 16-bit PNG
    buf = io.BytesIO()
    picture.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()

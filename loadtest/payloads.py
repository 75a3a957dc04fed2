"""Load-test payloads: a few real slices read once per locust process, shared by the HTTP and gRPC locustfiles.

The folder comes from ``BRAINTUMOR_LOADTEST_IMAGES`` (``braintumor loadtest --images DIR`` sets it); by default the
folder named by ``--images`` / ``BRAINTUMOR_LOADTEST_IMAGES`` (no default: a load test says what it sends). Up to ``BRAINTUMOR_LOADTEST_MAX_IMAGES``
(16) JPEG/PNG/DICOM files are taken, evenly spread over the sorted list so every class folder is represented.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from braintumor.clients.multipart import encode

IMAGES_ENV = "BRAINTUMOR_LOADTEST_IMAGES"
MAX_IMAGES_ENV = "BRAINTUMOR_LOADTEST_MAX_IMAGES"
SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm")
DEFAULT_MAX_IMAGES = 16


class PayloadError(RuntimeError):
    """No usable images: the message says where we looked and how to point at a folder."""


@dataclass(frozen=True)
class Payload:
    name: str  # file name, for messages only: the wire gets a neutral name (BRISC names carry the class)
    data: bytes
    content_type: str


def image_folder(folder: str | os.PathLike | None = None) -> Path:
    """The images folder: ``folder``, else ``$BRAINTUMOR_LOADTEST_IMAGES``; PayloadError saying how to name one."""
    chosen = folder or os.environ.get(IMAGES_ENV) or None
    how = (f"pass --images DIR or set {IMAGES_ENV}=DIR: a folder holding a few real JPEG/PNG/DICOM slices (searched "
           "recursively), e.g. the classification_task/test folder of a BRISC 2025 copy")
    if not chosen:
        raise PayloadError(f"no images folder given; {how}")
    path = Path(chosen)
    if not path.is_dir():
        raise PayloadError(f"no images folder at {path} ({IMAGES_ENV if not folder else '--images'}); {how}")
    return path


def pick_files(folder: Path, limit: int) -> list[Path]:
    """Up to ``limit`` image files under ``folder``, evenly spaced over the sorted list (deterministic)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    if not files:
        raise PayloadError(f"no {'/'.join(SUFFIXES)} files under {folder}; set {IMAGES_ENV} to a folder of slices")
    if len(files) <= limit:
        return files
    step = len(files) / limit
    return [files[int(k * step)] for k in range(limit)]


def _content_type(path: Path) -> str:
    return {".png": "image/png", ".dcm": "application/dicom"}.get(path.suffix.lower(), "image/jpeg")


@cache
def load_payloads(folder: str | None = None, limit: int | None = None) -> tuple[Payload, ...]:
    """The payloads, read from disk once per process (later calls return the same tuple)."""
    limit = limit or int(os.environ.get(MAX_IMAGES_ENV) or DEFAULT_MAX_IMAGES)
    files = pick_files(image_folder(folder), limit)
    return tuple(Payload(p.name, p.read_bytes(), _content_type(p)) for p in files)


def unique_bytes(payload: Payload, rng: random.Random) -> bytes:
    """The same image with a random nonce in a comment (JPEG COM segment, PNG tEXt chunk); pixels unchanged.

    The server caches explanations by the sha256 of the request bytes; without this, every explain after the first
    few would be a cache hit and the test would measure the cache, not the explainer. DICOM is returned as is.
    """
    nonce = f"loadtest {rng.getrandbits(64):016x}".encode()
    data = payload.data
    if data[:2] == b"\xff\xd8":  # JPEG: SOI, then a COM segment (length counts itself)
        return data[:2] + b"\xff\xfe" + struct.pack(">H", len(nonce) + 2) + nonce + data[2:]
    if data[:8] == b"\x89PNG\r\n\x1a\n":  # PNG: a tEXt chunk right after IHDR (8 + 4 + 4 + 13 + 4 bytes)
        body = b"Comment\x00" + nonce
        chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
        return data[:33] + chunk + data[33:]
    return data


def multipart(fields: dict[str, str], payload: Payload, data: bytes | None = None,
              field: str = "image") -> tuple[bytes, str]:
    """A multipart/form-data body with text ``fields`` and the image as file ``field``; returns (body, content type).

    Built here rather than by the HTTP client so both clients send byte-identical bodies; the SDK's encoder.
    """
    return encode(fields, field, payload.data if data is None else data,
                  filename=f"slice{Path(payload.name).suffix.lower()}", content_type=payload.content_type)

"""The one file digest: hex sha256 of a file's bytes, read in 1 MiB pieces. Duplicate slices (train/splits.py), the
ImageNet weight file a run started from (train/pretrained.py) and every artifact of an exported model version
(export/manifest.py) are named by it."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()

"""Which files `braintumor score` sends: every JPEG, PNG and DICOM file under a folder, and where each one's mask goes."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm")
_DICOM_MAGIC_OFFSET, _DICOM_MAGIC = 128, b"DICM"


@dataclass(frozen=True)
class Item:
    """One file to score: ``rel`` (posix path relative to INPUT) keys its row; ``mask_rel`` is its mask under --masks."""

    path: Path
    rel: str
    mask_rel: str


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(_DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC))
    except OSError:
        return False
    return head[_DICOM_MAGIC_OFFSET:] == _DICOM_MAGIC


def discover(root: Path, exclude: Iterable[Path] = ()) -> list[Item]:
    """Every JPEG, PNG and DICOM file under ``root`` (recursive; hidden files and ``exclude`` folders skipped), sorted
    by relative path. Extension-less files count when they carry the DICOM preamble."""
    root = Path(root)
    if root.is_file():
        return [Item(root, root.name, _mask_name(root.name))]
    skip = {Path(os.path.abspath(p)) for p in exclude}
    found: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if not d.startswith(".") and Path(os.path.abspath(here / d)) not in skip]
        for name in files:
            path = here / name
            if name.startswith(".") or Path(os.path.abspath(path)) in skip:
                continue
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES or (suffix == "" and _is_dicom_file(path)):
                found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    # A mask is the slice's path with .png; two slices that differ only by extension keep the extension instead.
    by_mask: dict[str, int] = {}
    for rel, _ in found:
        by_mask[_mask_name(rel)] = by_mask.get(_mask_name(rel), 0) + 1
    return [Item(path, rel, _mask_name(rel) if by_mask[_mask_name(rel)] == 1 else rel + ".png") for rel, path in found]


def _mask_name(rel: str) -> str:
    stem, dot, suffix = rel.rpartition(".")
    return (stem if dot and "/" not in suffix else rel) + ".png"

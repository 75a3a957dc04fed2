"""BRISC 2025 file-name grammar and the fixed class order shared by every layer."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Model output order. Export, serving and clients read it from the checkpoint / model metadata.
CLASSES: tuple[str, ...] = ("glioma", "meningioma", "pituitary", "no_tumor")
NO_TUMOR = "no_tumor"

# The dataset README says `nt` for no_tumor, but every real file name uses `no`; accept both.
TUMOUR_CODES: dict[str, str] = {"gl": "glioma", "me": "meningioma", "pi": "pituitary", "no": NO_TUMOR, "nt": NO_TUMOR}
# The code a file name of each class is written with (the first listed: `no`, as in the real files).
CLASS_CODES: dict[str, str] = {label: next(c for c, name in TUMOUR_CODES.items() if name == label) for label in CLASSES}
PLANE_CODES: dict[str, str] = {"ax": "axial", "co": "coronal", "sa": "sagittal"}
UNKNOWN_PLANE = "unknown"

_NAME = re.compile(
    r"^brisc2025_(?P<split>[a-z]+)_(?P<index>\d+)_(?P<tumour>[a-z]{2})_(?P<plane>[a-z]{2})_t1$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ParsedName:
    split: str
    index: int
    label: str
    plane: str


def parse_name(stem: str) -> ParsedName:
    """Parse a file stem such as ``brisc2025_train_00001_gl_ax_t1``.

    Raises ValueError naming the stem and the expected pattern when it does not match.
    """
    m = _NAME.match(stem)
    if m is None:
        raise ValueError(
            f"file name {stem!r} does not follow brisc2025_<split>_<index>_<gl|me|pi|no>_<ax|co|sa>_t1"
        )
    tumour, plane = m["tumour"].lower(), m["plane"].lower()
    if tumour not in TUMOUR_CODES:
        raise ValueError(f"file name {stem!r}: unknown tumour code {tumour!r}; expected one of gl, me, pi, no")
    if plane not in PLANE_CODES:
        raise ValueError(f"file name {stem!r}: unknown plane code {plane!r}; expected one of ax, co, sa")
    return ParsedName(m["split"].lower(), int(m["index"]), TUMOUR_CODES[tumour], PLANE_CODES[plane])


def try_parse_name(stem: str) -> ParsedName | None:
    try:
        return parse_name(stem)
    except ValueError:
        return None

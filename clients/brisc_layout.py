"""What `braintumor score --evaluate` knows about a BRISC 2025 folder: which files are slices, each slice's true class
and where its ground-truth mask is. A small re-implementation of the file-name grammar: clients import nothing
else of ours, so the class order and codes are train/naming.py's, restated; tests/unit/test_naming.py proves them
equal."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

CLASSES: tuple[str, ...] = ("glioma", "meningioma", "pituitary", "no_tumor")
# Every real file name uses `no` for no_tumor; the dataset README says `nt`. Accept both.
TUMOUR_CODES = {"gl": "glioma", "me": "meningioma", "pi": "pituitary", "no": "no_tumor", "nt": "no_tumor"}
_NAME = re.compile(r"^brisc2025_[a-z]+_\d+_(?P<code>[a-z]{2})_[a-z]{2}_t1$", re.IGNORECASE)
MASK_SUFFIXES = (".png", ".jpg", ".jpeg")
LAYOUT_HELP = ("--evaluate needs the BRISC 2025 layout: INPUT is the dataset root (classification_task/ and/or "
               "segmentation_task/), a classification_task/<split> folder (one folder per class) or a "
               "segmentation_task/<split> folder (images/ and masks/)")


def label_from_name(stem: str) -> str | None:
    """The class encoded in a BRISC file stem such as ``brisc2025_train_00001_gl_ax_t1``, else None."""
    m = _NAME.match(stem)
    return TUMOUR_CODES.get(m["code"].lower()) if m else None


def true_label(relpath: str) -> str | None:
    """The true class of a slice: the nearest enclosing folder named after a class, else the file name's code."""
    path = PurePosixPath(relpath)
    for parent in reversed(path.parts[:-1]):
        if parent in CLASSES:
            return parent
    return label_from_name(path.stem)


@dataclass
class BriscLayout:
    """A BRISC folder seen from INPUT: ``exclude`` are folders under INPUT that hold masks, not slices; ``mask_dirs``
    are the folders where ground-truth masks (same stem as the slice) live."""

    kind: str  # "root", "classification_split" or "segmentation_split"
    exclude: list[Path] = field(default_factory=list)
    mask_dirs: list[Path] = field(default_factory=list)

    def mask_index(self) -> dict[str, Path]:
        """Ground-truth mask path by file stem, over every mask folder."""
        index: dict[str, Path] = {}
        for folder in self.mask_dirs:
            for p in sorted(folder.iterdir()):
                if p.is_file() and p.suffix.lower() in MASK_SUFFIXES:
                    index.setdefault(p.stem, p)
        return index


def detect_layout(root: Path) -> BriscLayout | None:
    """Recognise INPUT as a BRISC root, a ``classification_task/<split>`` or a ``segmentation_task/<split>`` folder."""
    root = Path(root)
    cls_root, seg_root = root / "classification_task", root / "segmentation_task"
    if cls_root.is_dir() or seg_root.is_dir():
        seg_splits = sorted(p for p in seg_root.iterdir() if p.is_dir()) if seg_root.is_dir() else []
        masks = [s / "masks" for s in seg_splits if (s / "masks").is_dir()]
        # The segmentation images are the same slices as the classification ones: score them once, from there.
        exclude = [seg_root] if cls_root.is_dir() else masks
        return BriscLayout("root", exclude, masks)
    if root.parent.name == "classification_task" or any((root / c).is_dir() for c in CLASSES):
        sibling = root.parent.parent / "segmentation_task" / root.name / "masks"
        return BriscLayout("classification_split", [], [sibling] if sibling.is_dir() else [])
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return BriscLayout("segmentation_split", [root / "masks"], [root / "masks"])
    return None

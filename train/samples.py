"""The sample index: the official BRISC 2025 folder layout joined by file name into one row per slice."""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .naming import CLASSES, UNKNOWN_PLANE, try_parse_name

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
MASK_SUFFIXES = {".png", ".jpg", ".jpeg"}
SPLITS = ("train", "test")
LAYOUT_HELP = (
    "expected the BRISC 2025 layout: classification_task/{train,test}/{glioma,meningioma,pituitary,no_tumor}/*.jpg "
    "and/or segmentation_task/{train,test}/{images,masks}/"
)


class DatasetLayoutError(ValueError):
    """The dataset root does not look like BRISC 2025, or a file breaks the layout's rules."""


@dataclass
class Sample:
    key: str  # file stem: one slice, whichever task folders it appears in
    split: str
    label: str
    plane: str
    image_path: str
    mask_path: str | None = None

    @property
    def has_mask(self) -> bool:
        return self.mask_path is not None


@dataclass
class SampleIndex:
    root: Path
    samples: list[Sample]
    # Problems found while scanning (only kept when the caller asked to skip instead of failing).
    skipped: list[dict] = field(default_factory=list)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def splits(self) -> list[str]:
        return sorted({s.split for s in self.samples})

    def counts(self) -> dict[str, Counter]:
        out: dict[str, Counter] = {}
        for s in self.samples:
            out.setdefault(s.split, Counter())[s.label] += 1
        return out


def _files(folder: Path, suffixes: set[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def _problem(problems: list[dict], skip_bad: bool, path: Path, reason: str) -> None:
    if not skip_bad:
        raise DatasetLayoutError(f"{path}: {reason}")
    problems.append({"path": str(path), "reason": reason})


def build_index(root: str | Path, *, skip_bad: bool = False) -> SampleIndex:
    """Scan ``root`` and return every slice once, with its class, plane and mask (if any).

    The class comes from the classification folder when the slice is there, else from the file name's
    tumour code. A file whose name contradicts its folder, or a mask without its image, is an error
    (or, with ``skip_bad``, a recorded skip).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: dataset folder not found; pass the folder that holds classification_task/")
    cls_root, seg_root = root / "classification_task", root / "segmentation_task"
    if not cls_root.is_dir() and not seg_root.is_dir():
        raise DatasetLayoutError(f"{root}: no classification_task/ or segmentation_task/ folder; {LAYOUT_HELP}")

    problems: list[dict] = []
    by_key: dict[str, Sample] = {}

    for split in SPLITS:
        split_dir = cls_root / split
        if not split_dir.is_dir():
            continue
        unknown = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in CLASSES)
        if unknown:
            raise DatasetLayoutError(f"{split_dir}: unexpected class folder(s) {unknown}; {LAYOUT_HELP}")
        for label in CLASSES:
            class_dir = split_dir / label
            if not class_dir.is_dir():
                continue
            for path in _files(class_dir, IMAGE_SUFFIXES):
                parsed = try_parse_name(path.stem)
                if parsed is not None and parsed.label != label:
                    _problem(problems, skip_bad, path, f"file name says {parsed.label!r} but it sits in {label}/")
                    continue
                key = path.stem
                if key in by_key:
                    _problem(problems, skip_bad, path, f"the same file name also appears at {by_key[key].image_path}")
                    continue
                plane = parsed.plane if parsed else UNKNOWN_PLANE
                by_key[key] = Sample(key, split, label, plane, str(path))

    for split in SPLITS:
        img_dir, mask_dir = seg_root / split / "images", seg_root / split / "masks"
        if not img_dir.is_dir() and not mask_dir.is_dir():
            continue
        images = {p.stem: p for p in _files(img_dir, IMAGE_SUFFIXES)} if img_dir.is_dir() else {}
        masks = {p.stem: p for p in _files(mask_dir, MASK_SUFFIXES)} if mask_dir.is_dir() else {}
        for key, path in images.items():
            if key in by_key:
                continue  # same slice as in classification_task: one sample, not a duplicate
            parsed = try_parse_name(key)
            if parsed is None:
                _problem(problems, skip_bad, path, "segmentation image outside classification_task/ needs a BRISC "
                         "file name (…_<gl|me|pi|no>_<plane>_t1) to know its class")
                continue
            by_key[key] = Sample(key, split, parsed.label, parsed.plane, str(path))
        for key, mpath in masks.items():
            sample = by_key.get(key)
            if sample is None or sample.split != split:
                _problem(problems, skip_bad, mpath, f"mask has no image named {key}.* in {img_dir} or classification_task/")
                continue
            sample.mask_path = str(mpath)

    if not by_key:
        raise DatasetLayoutError(f"{root}: no images found; {LAYOUT_HELP}")
    samples = sorted(by_key.values(), key=lambda s: (s.split, s.key))
    return SampleIndex(root, samples, problems)


def write_samples_csv(samples: list[Sample], path: str | Path, extra: dict[str, list] | None = None) -> None:
    """Write samples (plus optional extra columns, one value per sample) as CSV."""
    names = [f.name for f in fields(Sample)] + list(extra or {})
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        for i, s in enumerate(samples):
            row = asdict(s)
            for col, values in (extra or {}).items():
                row[col] = values[i]
            writer.writerow(row)


def read_samples_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))

"""Duplicate-aware validation split of the train split, stratified by class and plane, and its CSV record."""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .hashing import file_sha256
from .samples import Sample

SPLIT_COLUMNS = ("key", "split_role", "label", "plane", "image_path", "mask_path", "group")


def duplicate_groups(samples: Iterable[Sample], *, progress: bool = False) -> dict[str, str]:
    """Map each sample key to its group id, the sha256 of its image bytes.

    Samples are already one per key (a slice in both task folders is one sample), so two keys in one
    group are true byte-identical copies under different names.
    """
    samples = list(samples)
    if progress:
        from .progress import progress_bar

        samples = progress_bar(samples, desc="hashing images", unit="img")
    return {s.key: file_sha256(s.image_path) for s in samples}


def stratum(sample: Sample) -> str:
    return f"{sample.label}/{sample.plane}"


def make_validation_split(
    samples: Sequence[Sample],
    val_fraction: float = 0.15,
    seed: int = 0,
    groups: dict[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """Split ``samples`` into (train_keys, val_keys), both sorted.

    Every class gets ``round(val_fraction * n_class)`` validation samples, shared over its planes in
    proportion (up to duplicate groups, which are never cut: all copies land on one side). The same inputs and seed give the same
    split. ``groups`` maps key -> group id; by default it is :func:`duplicate_groups`.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction} must be strictly between 0 and 1")
    if not samples:
        raise ValueError("no samples to split")
    if any(s.split == "test" for s in samples):
        raise ValueError("validation must be carved from the train split; the test split is for the final evaluation only")
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys):
        raise ValueError("samples contain repeated keys; pass one Sample per slice (build_index does)")
    if groups is None:
        groups = duplicate_groups(samples)
    missing = [k for k in keys if k not in groups]
    if missing:
        raise ValueError(f"groups has no entry for {len(missing)} sample(s), e.g. {missing[0]!r}")

    members: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        members[groups[s.key]].append(s)
    # A group belongs to its most common stratum (ties by name), so each group is drawn exactly once.
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for gid in sorted(members):
        counts = Counter(stratum(s) for s in members[gid])
        home = min(counts, key=lambda name: (-counts[name], name))
        by_stratum[home].append(gid)

    sizes = {name: sum(len(members[g]) for g in gids) for name, gids in by_stratum.items()}
    targets = _stratum_targets(sizes, val_fraction)
    rng = np.random.default_rng(seed)
    val_groups: set[str] = set()
    for name in sorted(by_stratum):
        gids, target = by_stratum[name], targets[name]
        taken = 0
        for i in rng.permutation(len(gids)):
            size = len(members[gids[i]])
            # Add a group when it brings the count closer to the target (a big group may overshoot by less than half).
            if abs(taken + size - target) < abs(taken - target):
                val_groups.add(gids[i])
                taken += size
            if taken >= target:
                break

    val = sorted(s.key for s in samples if groups[s.key] in val_groups)
    train = sorted(s.key for s in samples if groups[s.key] not in val_groups)
    return train, val


def _stratum_targets(sizes: dict[str, int], fraction: float) -> dict[str, int]:
    """Validation count per ``label/plane`` stratum: each class gets round(fraction * n_class), shared out
    over its planes by largest remainder, so small strata do not all round the same way."""
    targets: dict[str, int] = {}
    by_label: dict[str, list[str]] = defaultdict(list)
    for name in sorted(sizes):
        by_label[name.split("/")[0]].append(name)
    for names in by_label.values():
        exact = {name: fraction * sizes[name] for name in names}
        floors = {name: int(np.floor(v)) for name, v in exact.items()}
        spare = round(fraction * sum(sizes[name] for name in names)) - sum(floors.values())
        for name in sorted(names, key=lambda n: (floors[n] - exact[n], n))[:spare]:
            floors[name] += 1
        targets.update(floors)
    return targets


def write_split_csv(
    path: str | Path,
    samples: Sequence[Sample],
    val_keys: Iterable[str],
    groups: dict[str, str] | None = None,
) -> None:
    """Write one row per sample: key, split_role (train/val), label, plane, image_path, mask_path, group."""
    val = set(val_keys)
    unknown = val - {s.key for s in samples}
    if unknown:
        raise ValueError(f"{len(unknown)} validation key(s) are not among the samples, e.g. {sorted(unknown)[0]!r}")
    if groups is None:
        groups = duplicate_groups(samples)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SPLIT_COLUMNS)
        writer.writeheader()
        for s in samples:
            writer.writerow({
                "key": s.key,
                "split_role": "val" if s.key in val else "train",
                "label": s.label,
                "plane": s.plane,
                "image_path": s.image_path,
                "mask_path": s.mask_path or "",
                "group": groups[s.key],
            })


def read_split_csv(path: str | Path) -> set[str]:
    """Return the validation keys recorded by :func:`write_split_csv`."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"key", "split_role"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a split file, missing column(s) {sorted(missing)}; write it with write_split_csv")
        rows = list(reader)
    roles = {row["split_role"] for row in rows} - {"train", "val"}
    if roles:
        raise ValueError(f"{path}: split_role must be train or val, found {sorted(roles)}")
    return {row["key"] for row in rows if row["split_role"] == "val"}


def checkpoint_val_keys(checkpoint: str | Path, state: dict) -> set[str]:
    """The validation keys of a checkpoint's run: carried in the checkpoint, else the run folder's val_split.csv."""
    if state.get("val_keys"):
        return set(state["val_keys"])
    csv_path = Path(checkpoint).parent / "val_split.csv"
    if csv_path.exists():
        return read_split_csv(csv_path)
    raise FileNotFoundError(f"{checkpoint}: no validation keys inside and no val_split.csv beside it")

"""Validation split: stratified by class+plane, duplicate groups on one side, deterministic, CSV round trip."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import pytest

from braintumor.train.hashing import file_sha256
from braintumor.train.samples import build_index
from braintumor.train.splits import (
    SPLIT_COLUMNS,
    duplicate_groups,
    make_validation_split,
    read_split_csv,
    stratum,
    write_split_csv,
)
from braintumor.train.synthetic import make_synthetic_dataset

N_PER_CLASS = 30  # 10 per plane per class


def _copy_as(root: Path, src_key: str, label: str, new_key: str) -> None:
    folder = root / "classification_task" / "train" / label
    shutil.copyfile(folder / f"{src_key}.jpg", folder / f"{new_key}.jpg")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("plain"), n_per_class=N_PER_CLASS, size=(48, 48))
    return build_index(root).samples


@pytest.fixture(scope="module")
def with_duplicates(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("dups"), n_per_class=N_PER_CLASS, size=(48, 48))
    # Five glioma slices each copied under a second (and the first one a third) BRISC name.
    for i in range(1, 6):
        _copy_as(root, f"brisc2025_train_{i:05d}_gl_{'ax co sa'.split()[(i - 1) % 3]}_t1", "glioma",
                 f"brisc2025_train_{9000 + i:05d}_gl_{'ax co sa'.split()[(i - 1) % 3]}_t1")
    _copy_as(root, "brisc2025_train_00001_gl_ax_t1", "glioma", "brisc2025_train_09100_gl_ax_t1")
    return build_index(root).samples


def test_duplicate_groups_share_the_hash_of_identical_bytes(with_duplicates):
    groups = duplicate_groups(with_duplicates)
    sizes = Counter(groups.values())
    assert sorted(n for n in sizes.values() if n > 1) == [2, 2, 2, 2, 3]
    # A tumour slice sits in both task folders: that is one sample, not a duplicate.
    assert len(groups) == 4 * N_PER_CLASS + 6
    first = next(s for s in with_duplicates if s.key == "brisc2025_train_00001_gl_ax_t1")
    assert groups[first.key] == groups["brisc2025_train_09100_gl_ax_t1"] == file_sha256(first.image_path)


def test_every_stratum_gets_the_requested_fraction(plain):
    train, val = make_validation_split(plain, val_fraction=0.2, seed=0)
    assert sorted(train + val) == sorted(s.key for s in plain)
    assert not set(train) & set(val)
    val_set = set(val)
    per_stratum = Counter(stratum(s) for s in plain if s.key in val_set)
    assert len(per_stratum) == 12
    assert set(per_stratum.values()) == {2}  # round(0.2 * 10) in each class+plane


@pytest.mark.parametrize("seed", range(8))
def test_duplicates_never_straddle_train_and_val(with_duplicates, seed):
    groups = duplicate_groups(with_duplicates)
    train, val = make_validation_split(with_duplicates, val_fraction=0.3, seed=seed, groups=groups)
    assert {groups[k] for k in train}.isdisjoint({groups[k] for k in val})


def test_split_is_deterministic_per_seed(plain):
    groups = duplicate_groups(plain)
    first = make_validation_split(plain, seed=3, groups=groups)
    assert make_validation_split(plain, seed=3, groups=groups) == first
    assert make_validation_split(plain, seed=4, groups=groups)[1] != first[1]


def test_fraction_per_class_is_close_on_uneven_strata(with_duplicates):
    _, val = make_validation_split(with_duplicates, val_fraction=0.15, seed=1)
    val_set = set(val)
    for label in ("glioma", "meningioma", "pituitary", "no_tumor"):
        members = [s for s in with_duplicates if s.label == label]
        share = sum(s.key in val_set for s in members) / len(members)
        assert abs(share - 0.15) <= 1 / len(members), (label, share)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_fraction_is_refused(plain, fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        make_validation_split(plain, val_fraction=fraction)


def test_test_split_is_refused(tmp_path):
    root = make_synthetic_dataset(tmp_path, n_per_class=2, size=(32, 32), split="test")
    with pytest.raises(ValueError, match="test split"):
        make_validation_split(build_index(root).samples)


def test_split_csv_round_trip(with_duplicates, tmp_path):
    groups = duplicate_groups(with_duplicates)
    _, val = make_validation_split(with_duplicates, seed=0, groups=groups)
    path = tmp_path / "out" / "split.csv"
    write_split_csv(path, with_duplicates, val, groups=groups)
    assert read_split_csv(path) == set(val)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == SPLIT_COLUMNS
    assert len(rows) == len(with_duplicates)
    by_key = {r["key"]: r for r in rows}
    no_tumor = next(s for s in with_duplicates if s.label == "no_tumor")
    assert by_key[no_tumor.key]["mask_path"] == ""
    assert all(by_key[k]["group"] == g for k, g in groups.items())
    assert Counter(r["split_role"] for r in rows) == {"train": len(with_duplicates) - len(val), "val": len(val)}


def test_write_refuses_unknown_val_keys(plain, tmp_path):
    with pytest.raises(ValueError, match="not among the samples"):
        write_split_csv(tmp_path / "split.csv", plain, ["brisc2025_train_99999_gl_ax_t1"])


def test_read_refuses_a_file_without_split_columns(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("key,label\na,glioma\n")
    with pytest.raises(ValueError, match="split_role"):
        read_split_csv(path)

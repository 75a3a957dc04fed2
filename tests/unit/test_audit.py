"""Data audit on synthetic BRISC-layout data: exact counts, duplicates, masks, shortcuts, problems, leakage probe."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from braintumor.train.audit import run_audit
from braintumor.train.decode import ImageDecodeError
from braintumor.train.synthetic import make_synthetic_dataset

N_TRAIN, N_TEST = 6, 10  # per class; train slices are 72x64 (non-square), test slices 64x64
GL_FIRST = "brisc2025_train_00001_gl_ax_t1"
GL_COPY = "brisc2025_train_09001_gl_ax_t1"


def _dataset(root):
    make_synthetic_dataset(root, n_per_class=N_TRAIN, size=(72, 64), split="train", seed=0)
    make_synthetic_dataset(root, n_per_class=N_TEST, size=(64, 64), split="test", seed=1)
    glioma = root / "classification_task" / "train" / "glioma"
    shutil.copyfile(glioma / f"{GL_FIRST}.jpg", glioma / f"{GL_COPY}.jpg")  # a byte-identical copy, no mask
    return root


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = _dataset(tmp_path_factory.mktemp("data"))
    # One mask saved at another size than its image.
    mask = root / "segmentation_task" / "test" / "masks" / "brisc2025_test_00001_gl_ax_t1.png"
    Image.fromarray(np.zeros((32, 32), np.uint8) + 255).save(mask)
    out = tmp_path_factory.mktemp("audit")
    return run_audit(root, out), out


def test_counts_per_split_class_and_plane(audited):
    counts = audited[0]["counts"]
    train, test = counts["images"]["train"], counts["images"]["test"]
    assert train["total"] == 4 * N_TRAIN + 1 and test["total"] == 4 * N_TEST
    assert train["classes"]["glioma"] == {"total": N_TRAIN + 1, "planes": {"axial": 3, "coronal": 2, "sagittal": 2}}
    assert test["classes"]["no_tumor"]["planes"] == {"axial": 4, "coronal": 3, "sagittal": 3}
    assert counts["masks"]["train"] == {"total": 3 * N_TRAIN, "classes": {"glioma": 6, "meningioma": 6, "pituitary": 6}}
    assert counts["masks"]["test"]["total"] == 3 * N_TEST


def test_duplicates_count_copies_not_task_folders(audited):
    dup = audited[0]["duplicates"]
    assert (dup["groups"], dup["files"], dup["extra_copies"]) == (1, 2, 1)
    assert dup["within_split_groups"] == 1 and dup["cross_split_groups"] == 0
    assert dup["any_mixed_class"] is False
    assert sorted(dup["list"][0]["keys"]) == [GL_FIRST, GL_COPY]
    assert dup["list"][0]["labels"] == ["glioma"]


def test_shortcuts_per_class(audited):
    shortcuts = audited[0]["shortcuts"]
    assert shortcuts["no_tumor"]["modes"] == {"RGB": N_TRAIN + N_TEST}
    assert shortcuts["glioma"]["modes"] == {"L": N_TRAIN + 1 + N_TEST}
    assert shortcuts["glioma"]["non_square"] == N_TRAIN + 1
    assert shortcuts["no_tumor"]["non_square_share"] == pytest.approx(N_TRAIN / (N_TRAIN + N_TEST))
    assert shortcuts["no_tumor"]["distinct_sizes"] == 2
    assert shortcuts["no_tumor"]["top_sizes"] == {"64x64": N_TEST, "64x72": N_TRAIN}
    assert shortcuts["all"]["aspect_ratio"]["p0"] == pytest.approx(64 / 72)
    assert shortcuts["all"]["colour_images"] == 0  # RGB with equal channels is not colour


def test_mask_stats(audited):
    masks = audited[0]["masks"]
    assert masks["count"] == 3 * (N_TRAIN + N_TEST)
    assert masks["empty_after_threshold"] == 0
    assert 0.0 < masks["soft_edge_fraction"] < 1.0
    assert masks["size_mismatches"] == 1
    assert masks["size_mismatch_list"][0]["key"] == "brisc2025_test_00001_gl_ax_t1"
    assert 0.0 < masks["area_fraction"]["p50"] < 0.2


def test_geometry_leakage_probe(audited):
    leak = audited[0]["geometry_leakage"]
    assert set(leak["geometries"]) == {"crop_pad", "pad", "resize"}
    for result in leak["geometries"].values():
        assert result["all"]["n"] == 4 * (N_TRAIN + N_TEST) + 1
        assert 0.0 <= result["all"]["auc"] <= 1.0
    # Synthetic heads never touch the frame, so crop_pad maps a padded canvas to the very same input.
    assert leak["geometries"]["crop_pad"]["canvas_only"]["auc"] == pytest.approx(0.5)
    assert leak["geometries"]["pad"]["canvas_only"]["auc"] > 0.9
    assert leak["least_leaking"] == "crop_pad"


def test_reports_are_written(audited):
    report, out = audited
    assert json.loads((out / "audit.json").read_text()) == json.loads(json.dumps(report))
    md = (out / "audit.md").read_text()
    for heading in ("## Counts", "## Byte-identical images", "## Shortcuts per class", "## Masks", "## Geometry leakage"):
        assert heading in md
    assert "Conclusion: **crop_pad**" in md


def test_leakage_sample_keeps_every_non_square_image(tmp_path):
    report = run_audit(_dataset(tmp_path / "data"), tmp_path / "out", leakage_sample=56)
    probe = report["geometry_leakage"]["geometries"]["crop_pad"]["all"]
    assert (probe["n"], probe["n_non_square"]) == (56, 4 * N_TRAIN + 1)


def test_unreadable_image_raises_naming_the_file(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", n_per_class=2, size=(32, 32))
    bad = root / "classification_task" / "train" / "meningioma" / "brisc2025_train_00099_me_co_t1.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ImageDecodeError, match="brisc2025_train_00099_me_co_t1"):
        run_audit(root, tmp_path / "out")
    report = run_audit(root, tmp_path / "out", skip_bad=True)
    assert report["problems"]["count"] == 1
    assert report["problems"]["items"][0]["path"] == str(bad)
    assert report["counts"]["images"]["train"]["classes"]["meningioma"]["total"] == 2


def test_unreadable_mask_is_named_when_skipped(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", n_per_class=2, size=(32, 32))
    mask = root / "segmentation_task" / "train" / "masks" / "brisc2025_train_00001_gl_ax_t1.png"
    mask.write_bytes(b"")
    report = run_audit(root, tmp_path / "out", skip_bad=True)
    assert [p["path"] for p in report["problems"]["items"]] == [str(mask)]

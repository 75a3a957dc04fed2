import shutil

import pytest

from braintumor.train.samples import DatasetLayoutError, build_index


def test_join_counts_each_slice_once(synthetic_root):
    index = build_index(synthetic_root)
    assert len(index.samples) == 16  # seg images are the same slices as in classification_task
    assert sum(s.has_mask for s in index.samples) == 12
    assert all(not s.has_mask for s in index.samples if s.label == "no_tumor")
    assert all("classification_task" in s.image_path for s in index.samples)
    assert index.splits() == ["train"]
    assert dict(index.counts()["train"]) == {"glioma": 4, "meningioma": 4, "pituitary": 4, "no_tumor": 4}


def test_segmentation_only_root(synthetic_root):
    shutil.rmtree(synthetic_root / "classification_task")
    index = build_index(synthetic_root)
    assert len(index.samples) == 12 and all(s.has_mask for s in index.samples)
    assert {s.label for s in index.samples} == {"glioma", "meningioma", "pituitary"}


def test_missing_root_and_bad_layout(tmp_path):
    with pytest.raises(DatasetLayoutError, match="not found"):
        build_index(tmp_path / "nope")
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetLayoutError, match="classification_task"):
        build_index(tmp_path)


def test_unknown_class_folder(synthetic_root):
    (synthetic_root / "classification_task" / "train" / "astrocytoma").mkdir()
    with pytest.raises(DatasetLayoutError, match="astrocytoma"):
        build_index(synthetic_root)


def test_mask_without_image_is_error_or_counted(synthetic_root):
    masks = synthetic_root / "segmentation_task" / "train" / "masks"
    orphan = masks / "brisc2025_train_09999_gl_ax_t1.png"
    shutil.copy(next(masks.iterdir()), orphan)
    with pytest.raises(DatasetLayoutError, match="brisc2025_train_09999_gl_ax_t1"):
        build_index(synthetic_root)
    index = build_index(synthetic_root, skip_bad=True)
    assert len(index.samples) == 16
    assert [p["path"] for p in index.skipped] == [str(orphan)]


def test_name_contradicting_folder(synthetic_root):
    cls = synthetic_root / "classification_task" / "train"
    src = next((cls / "glioma").iterdir())
    shutil.move(src, cls / "pituitary" / src.name)
    with pytest.raises(DatasetLayoutError, match="sits in pituitary"):
        build_index(synthetic_root)

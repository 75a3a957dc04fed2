import numpy as np
import pytest

from braintumor.train.augment import build_augmentation
from braintumor.train.datasets import BalancedSampler, ShuffleSampler, SliceDataset
from braintumor.train.trainer.schedule import TaskSchedule


@pytest.mark.parametrize(
    "seg_every, steps, expected",
    [
        (2, 5, ["cls", "cls", "seg", "cls", "cls", "seg", "cls"]),
        (1, 3, ["cls", "seg", "cls", "seg", "cls", "seg"]),
        (3, 3, ["cls", "cls", "cls", "seg"]),
    ],
)
def test_alternation_order(seg_every, steps, expected):
    assert TaskSchedule(seg_every).epoch(steps) == expected


def test_no_segmentation_means_classification_only():
    assert TaskSchedule(2, segmentation=False).epoch(3) == ["cls"] * 3


def test_balanced_sampler_balances_classes_and_is_epoch_seeded():
    targets = np.array([0] * 90 + [1] * 10)
    sampler = BalancedSampler(targets, np.arange(100), 20000, seed=1)
    rows = [r for r, _ in sampler]
    share = np.bincount(targets[rows]) / len(rows)
    assert abs(share[1] - 0.5) < 0.02
    assert list(sampler)[:5] == list(sampler)[:5]
    sampler.set_epoch(1)
    assert [r for r, _ in sampler][:50] != rows[:50]


def test_shuffle_sampler_is_a_permutation():
    sampler = ShuffleSampler(np.arange(3, 13), seed=0)
    assert sorted(r for r, _ in sampler) == list(range(3, 13))


def test_augmentation_is_identical_on_image_and_mask_and_seeded():
    rng = np.random.default_rng(0)
    images = np.zeros((2, 48, 48), np.uint8)
    images[:, 10:20, 5:15] = 200
    masks = (images > 100).astype(np.uint8)
    ds = SliceDataset(images, masks, ["glioma", "no_tumor"], build_augmentation())
    for seed in rng.integers(0, 1000, 10).tolist():
        a, b = ds[(0, seed)], ds[(0, seed)]
        assert (a["image"] == b["image"]).all() and (a["mask"] == b["mask"]).all()
        img, mask = a["image"][0].numpy(), a["mask"][0].numpy()
        assert set(np.unique(mask)) <= {0, 1}
        # The mask moved with the image: the bright square and the mask still coincide (up to interpolation).
        if mask.sum():
            assert img[mask == 1].mean() > 120
    assert ds[(0, 1)]["label"].item() == 0 and ds[(1, 1)]["label"].item() == 3

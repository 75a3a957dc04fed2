"""The learned OOD score (train/ood.py) on toy features, and the probe set it is reported on (train/ood_probe.py)."""

import numpy as np
import pytest

from braintumor.train.ood import (
    OodModel,
    fit_gaussians,
    fit_ood,
    mahalanobis,
    out_of_fold_scores,
    refer_rate,
    whitening_of,
)
from braintumor.train.ood_probe import probe_images, probe_kind

MEANS = np.array([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0], [0.0, 6.0, 0.0]])


def _toy(n_per_class=400, seed=0):
    rng = np.random.default_rng(seed)
    cov = np.array([[1.0, 0.6, 0.0], [0.6, 2.0, 0.3], [0.0, 0.3, 0.5]])
    feats = np.concatenate([rng.multivariate_normal(m, cov, n_per_class) for m in MEANS])
    return feats, np.repeat(np.arange(len(MEANS)), n_per_class)


def test_score_is_the_exact_min_mahalanobis_distance():
    feats, labels = _toy()
    means, precision, shrinkage = fit_gaussians(feats, labels, 3)
    np.testing.assert_allclose(means, [feats[labels == c].mean(0) for c in range(3)])
    assert 0.0 <= shrinkage < 0.1  # 1,200 samples in 3 dims: Ledoit-Wolf barely shrinks
    model = OodModel(means, whitening_of(precision), 0.0)
    points = np.array([[0.1, -0.2, 0.3], [5.0, 1.0, -1.0], [30.0, -20.0, 4.0]])
    expected = [min(float((p - m) @ precision @ (p - m)) for m in means) for p in points]  # the definition, by loop
    np.testing.assert_allclose(mahalanobis(points, means, precision), expected, rtol=1e-12)
    np.testing.assert_allclose(model.score(points), expected, rtol=1e-10)  # W W^T = P


def test_far_point_is_above_the_threshold_and_training_points_mostly_below():
    feats, labels = _toy()
    model = fit_ood(feats, labels, 3, quantile=0.99)
    oof = out_of_fold_scores(feats, labels, 3)
    assert model.threshold == pytest.approx(np.quantile(oof, 0.99))
    assert (oof > model.score(feats)).mean() > 0.5  # in-sample scores run low: why the threshold is out-of-fold
    assert refer_rate(model.score(feats), model.threshold) <= 0.01
    held_out, _ = _toy(seed=1)
    assert refer_rate(model.score(held_out), model.threshold) < 0.03  # same distribution, unseen points
    far = np.array([[3.0, 3.0, 8.0], [-10.0, 0.0, 0.0]])
    assert (model.score(far) > model.threshold).all()
    between = np.array([[3.0, 0.0, 0.0]])  # half way between two class means: in neither Gaussian's bulk
    assert model.score(between)[0] > model.threshold


def test_state_round_trip_keeps_the_score():
    feats, labels = _toy()
    model = fit_ood(feats, labels, 3)
    state = model.to_state()
    assert state["means"].dtype == np.float32 and state["whitening"].shape == (3, 3)
    again = OodModel.from_state(state)
    assert again.threshold == model.threshold and again.quantile == model.quantile
    np.testing.assert_allclose(again.score(feats[:10]), model.score(feats[:10]), rtol=1e-5)


def test_fit_refuses_a_class_without_slices():
    feats, labels = _toy()
    with pytest.raises(ValueError, match="counts per class"):
        fit_gaussians(feats, labels, 4)  # class 3 has no slice


def test_probe_set_is_grey_uint8_and_covers_every_family():
    probes = probe_images(size=64)
    assert {probe_kind(n) for n in probes} == {"noise", "blank", "gradient", "checkerboard", "photo", "phantom"}
    for name, image in probes.items():
        assert image.dtype == np.uint8 and image.ndim == 2 and min(image.shape) >= 64, name
    assert probes["blank_black"].max() == 0 and probes["blank_white"].min() == 255
    assert probes["uniform_noise"].std() > 60
    assert len([n for n in probes if probe_kind(n) == "photo"]) >= 15
    np.testing.assert_array_equal(probe_images(size=64, photos=False)["uniform_noise"], probes["uniform_noise"])

"""Evaluation decodes each slice once: the geometries decode_samples computes are the ones original-resolution Dice
would compute again, and with them the scores are identical."""

import numpy as np
import pytest

import braintumor.train.evaluate as evaluate
from braintumor.train.cache import decode_samples
from braintumor.train.decode import decode_image
from braintumor.train.naming import CLASSES
from braintumor.train.preprocess import PreprocessConfig, compute_geometry
from braintumor.train.samples import build_index


def _not_again(path):
    raise AssertionError(f"{path} was decoded a second time")


def test_original_resolution_scores_are_identical_with_the_decoded_geometries(synthetic_root, tmp_path, monkeypatch):
    samples = build_index(synthetic_root).samples
    cfg = PreprocessConfig(image_size=32)
    images, masks, kept, skipped, geometries = decode_samples(samples, cfg, progress=False, geometries=True)
    plain = decode_samples(samples, cfg, progress=False)
    assert len(plain) == 4 and [s.key for s in plain[2]] == [s.key for s in kept] and not skipped
    np.testing.assert_array_equal(plain[0], images)
    assert geometries == [compute_geometry(decode_image(s.image_path).pixels, cfg) for s in kept]

    rng = np.random.default_rng(0)  # a prediction near the truth, so Dice is neither 0 nor 1
    mask_probs = np.clip(masks * 0.8 + rng.random(masks.shape) * 0.4, 0, 1).astype(np.float32)
    probs = rng.dirichlet(np.ones(len(CLASSES)), len(kept)).astype(np.float32)
    cams = rng.random((len(kept), len(CLASSES), 4, 4)).astype(np.float32)
    decoded_again = evaluate.original_resolution_segmentation(kept, mask_probs, cfg)
    again = evaluate.score_and_report(kept, images, masks, probs, mask_probs, cams, tmp_path / "again", {},
                                      preprocess=cfg)

    monkeypatch.setattr(evaluate, "decode_image", _not_again)
    once = evaluate.original_resolution_segmentation(kept, mask_probs, cfg, geometries=geometries)
    for key in ("dice_per_slice", "iou_per_slice"):
        np.testing.assert_array_equal(once[key], decoded_again[key])
    assert 0 < np.nanmean(once["dice_per_slice"]) < 1
    scored = evaluate.score_and_report(kept, images, masks, probs, mask_probs, cams, tmp_path / "once", {},
                                       preprocess=cfg, geometries=geometries)
    assert scored == again and "dice_original" in scored


def test_pointing_game_heatmap_scores_the_served_heatmap_of_the_predicted_class(synthetic_root, tmp_path):
    """pointing_game_heatmap is the served heatmap's (the PREDICTED class's map): a model whose true class's map points
    at the tumour but that predicts another class, whose map points elsewhere, scores 1 on the Grad-CAM pointing game
    and 0 on the heatmap's."""
    samples = build_index(synthetic_root).samples
    cfg = PreprocessConfig(image_size=32)
    images, masks, kept, _, _ = decode_samples(samples, cfg, progress=False, geometries=True)
    tumour = np.array([s.has_mask for s in kept])
    y_true = np.array([CLASSES.index(s.label) for s in kept])
    wrong = (y_true + 1) % len(CLASSES)
    probs = np.full((len(kept), len(CLASSES)), 0.01, np.float32)
    probs[np.arange(len(kept)), wrong] = 0.97
    cams = np.zeros((len(kept), len(CLASSES), 32, 32), np.float32)
    for i, mask in enumerate(masks):
        if mask.any():
            y, x = np.argwhere(mask)[len(np.argwhere(mask)) // 2]
            cams[i, y_true[i], y, x] = 1.0  # the true class points into the tumour
            far = np.unravel_index(np.argmax(np.abs(np.indices(mask.shape) - np.array([y, x])[:, None, None]).sum(0)),
                                   mask.shape)
            cams[i, wrong[i], far[0], far[1]] = 1.0  # the predicted class points at the farthest pixel
    scored = evaluate.score_and_report(kept, images, masks, probs, masks.astype(np.float32), cams, tmp_path, {})
    assert tumour.any()
    assert scored["pointing_game_gradcam"] == 1.0 and scored["pointing_game_heatmap"] == 0.0


def test_empty_fp_rate_counts_the_no_tumor_slices_without_mask_files(synthetic_root, tmp_path):
    """BRISC ships no mask file for no_tumor slices; their truth is empty all the same, so the false-positive mask rate
    is the share of no_tumor slices with any predicted tumour pixel (it was NaN: no slice to count), and Dice/IoU
    stay means over the tumour slices."""
    samples = build_index(synthetic_root).samples
    cfg = PreprocessConfig(image_size=32)
    images, masks, kept, _, _ = decode_samples(samples, cfg, progress=False, geometries=True)
    y_true = np.array([CLASSES.index(s.label) for s in kept])
    no_tumor = np.flatnonzero(y_true == CLASSES.index("no_tumor"))
    assert len(no_tumor) >= 2 and not any(kept[i].has_mask for i in no_tumor)
    probs = np.eye(len(CLASSES), dtype=np.float32)[y_true]
    mask_probs = masks.astype(np.float32)
    mask_probs[no_tumor[0], 3:6, 3:6] = 0.9  # one no_tumor slice gets a false-positive mask
    cams = np.zeros((len(kept), len(CLASSES), 2, 2), np.float32)
    scored = evaluate.score_and_report(kept, images, masks, probs, mask_probs, cams, tmp_path, {})
    assert scored["empty_fp_rate"] == pytest.approx(1 / len(no_tumor))
    assert scored["dice"] == pytest.approx(1.0)

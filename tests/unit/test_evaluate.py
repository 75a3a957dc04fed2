"""Evaluation decodes each slice once: the geometries decode_samples computes are the ones original-resolution Dice
would compute again, and with them the scores are identical."""

import numpy as np

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

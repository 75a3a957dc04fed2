import numpy as np
import pytest

from braintumor.train.cache import load_cache, prepare_cache
from braintumor.train.decode import ImageDecodeError
from braintumor.train.preprocess import PreprocessConfig
from braintumor.train.samples import build_index


def test_cache_round_trip_and_reuse(synthetic_root, tmp_path):
    samples = build_index(synthetic_root).samples
    cfg = PreprocessConfig(image_size=32)
    cache = prepare_cache(samples, cfg, tmp_path / "c", progress=False)
    assert cache.images.shape == (16, 32, 32) and cache.images.dtype == np.uint8
    assert [s.key for s in cache.samples] == [s.key for s in samples]
    with_mask = np.array([s.has_mask for s in cache.samples])
    assert (cache.masks.reshape(16, -1).max(1) == with_mask).all()  # no_tumor masks are empty
    mtime = (tmp_path / "c" / "images.npy").stat().st_mtime_ns
    again = prepare_cache(samples, cfg, tmp_path / "c", progress=False)
    assert (tmp_path / "c" / "images.npy").stat().st_mtime_ns == mtime  # same fingerprint: reused
    np.testing.assert_array_equal(again.images, cache.images)
    assert load_cache(tmp_path / "c").preprocess == cfg


def test_unreadable_image_fails_or_is_skipped(synthetic_root, tmp_path):
    samples = build_index(synthetic_root).samples
    broken = samples[3].image_path
    with open(broken, "wb") as fh:
        fh.write(b"\xff\xd8\xff truncated")
    with pytest.raises(ImageDecodeError, match=broken.split("/")[-1]):
        prepare_cache(samples, PreprocessConfig(image_size=32), tmp_path / "c", progress=False)
    cache = prepare_cache(samples, PreprocessConfig(image_size=32), tmp_path / "c", progress=False, skip_bad=True)
    assert len(cache.samples) == 15 and cache.skipped[0]["path"] == broken

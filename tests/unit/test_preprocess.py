import io

import numpy as np
import pytest
from PIL import Image

from braintumor.train.decode import ImageDecodeError, decode_image, decode_mask
from braintumor.train.preprocess import (
    PreprocessConfig,
    compute_geometry,
    invert_geometry,
    mask_to_original,
    preprocess,
    preprocess_mask,
)


def _png(arr, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def _head(h=60, w=80) -> np.ndarray:
    img = np.zeros((h, w), np.uint8)
    img[10:50, 20:70] = 120
    img[20:30, 30:40] = 250
    return img


def test_rgb_with_equal_channels_reads_as_grey():
    grey = _head()
    rgb = np.stack([grey] * 3, -1)
    out = decode_image(_png(rgb))
    assert not out.is_colour and out.mode == "RGB"
    np.testing.assert_array_equal(out.pixels, grey)


def test_colour_photo_is_flagged():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    assert decode_image(_png(photo)).is_colour


def test_16bit_png_is_scaled_to_uint8():
    arr = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    out = decode_image(_png(arr))
    assert out.pixels.dtype == np.uint8 and out.pixels.min() == 0 and out.pixels.max() == 255


@pytest.mark.parametrize(
    "data, fragment",
    [(b"", "empty"), (b"hello, not an image", "not a readable image"), (_png(_head())[:60], "corrupt or truncated")],
)
def test_bad_bytes_raise_clear_errors(data, fragment):
    with pytest.raises(ImageDecodeError, match=fragment):
        decode_image(data)


def test_tiny_image_rejected():
    with pytest.raises(ImageDecodeError, match="at least 8x8"):
        decode_image(_png(np.zeros((1, 1), np.uint8)))


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ImageDecodeError, match="nope.jpg"):
        decode_image(tmp_path / "nope.jpg")


def test_soft_mask_threshold_at_128():
    mask = np.array([[0, 127, 128, 255]] * 8 + [[0, 0, 0, 0]] * 0, np.uint8).repeat(2, 1)
    np.testing.assert_array_equal(decode_mask(_png(mask))[0], [0, 0, 0, 0, 1, 1, 1, 1])


@pytest.mark.parametrize("geometry", ["crop_pad", "pad", "resize"])
def test_preprocess_is_deterministic_and_square(geometry):
    cfg = PreprocessConfig(image_size=32, geometry=geometry)
    a, ga = preprocess(_head(), cfg)
    b, gb = preprocess(_head(), cfg)
    assert a.shape == (32, 32) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert ga == gb


def test_crop_pad_removes_the_canvas_shape():
    cfg = PreprocessConfig(image_size=32, geometry="crop_pad", crop_margin=0)
    same_head_wide_canvas = np.zeros((60, 140), np.uint8)
    same_head_wide_canvas[:, 30:110] = _head()
    a, _ = preprocess(_head(), cfg)
    b, _ = preprocess(same_head_wide_canvas, cfg)
    np.testing.assert_array_equal(a, b)  # the canvas' aspect ratio leaves no trace


@pytest.mark.parametrize("offset, colour", [(0, False), (1, False), (2, False), (3, True)])
def test_grey_is_a_mean_channel_difference_of_at_most_two_levels(offset, colour):
    """JPEG chroma noise: channels a few levels apart are still a grey slice (its red channel); more is a photo."""
    grey = _head()
    rgb = np.stack([grey, grey + offset, grey + 2 * offset], -1).astype(np.uint8)
    out = decode_image(_png(rgb))
    assert out.is_colour is colour
    if not colour:
        np.testing.assert_array_equal(out.pixels, grey)


def _blobs(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:size, :size]
    prob = np.zeros((size, size), np.float32)
    for cy, cx, r in [(size // 2, size // 2, size // 2), *rng.integers(0, size, (2, 3))]:  # one blob in the middle
        prob = np.maximum(prob, np.clip(1.3 - np.hypot(yy - cy, xx - cx) / max(r / 3, 2), 0, 1))
    return prob


@pytest.mark.parametrize("shape, box, size", [
    ((512, 512), (40, 480, 60, 470), 192),  # enlarged: the usual slice
    ((300, 700), (0, 300, 0, 700), 192),  # a head touching the frame: padding on both sides
    ((120, 90), (5, 115, 10, 85), 192),  # a small slice: the map is reduced
    ((900, 260), (100, 890, 3, 257), 64),
])
@pytest.mark.parametrize("seed", range(4))
def test_mask_to_original_resamples_only_where_the_mask_can_be(shape, box, size, seed):
    """The windowed mask equals thresholding the full bilinear resample (invert_geometry), except where Pillow's
    fixed-point rounding puts a pixel one level from the threshold; an empty map costs nothing and maps to zeros."""
    pixels = np.zeros(shape, np.uint8)
    pixels[box[0]:box[1], box[2]:box[3]] = 200
    geom = compute_geometry(pixels, PreprocessConfig(image_size=size))
    prob = _blobs(size, seed)
    levels = np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)
    full = invert_geometry(levels, geom)
    got = mask_to_original(prob, geom)
    assert got.shape == shape and got.dtype == np.uint8
    differ = got != (full >= 128)
    assert np.isin(full[differ], (127, 128)).all()
    assert differ.sum() <= max(3, 0.001 * got.sum())
    assert got.sum() > 0
    np.testing.assert_array_equal(mask_to_original(np.full((size, size), 0.49, np.float32), geom), 0)


def test_mask_follows_image_geometry_and_inverts():
    cfg = PreprocessConfig(image_size=50, geometry="crop_pad", crop_margin=0)
    img = _head()
    mask = (img == 250).astype(np.uint8)
    square, geom = preprocess(img, cfg)
    small = preprocess_mask(mask, geom)
    assert set(np.unique(small)) <= {0, 1}
    assert (square[small == 1] > 200).mean() > 0.9  # the mask still lands on the bright blob
    back = invert_geometry(small, geom, nearest=True)
    assert back.shape == mask.shape
    assert np.logical_and(back, mask).sum() / np.logical_or(back, mask).sum() > 0.8


def test_config_round_trip_and_validation():
    cfg = PreprocessConfig(image_size=64, geometry="pad")
    assert PreprocessConfig.from_dict({**cfg.to_dict(), "unknown_future_key": 1}) == cfg
    with pytest.raises(ValueError, match="geometry"):
        PreprocessConfig(geometry="stretch")


def test_decompression_bomb_is_refused(monkeypatch):
    import braintumor.train.decode_common as decode_module  # check_size reads the budget there

    monkeypatch.setattr(decode_module, "MAX_PIXELS", 1000)
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(_png(_head()))  # 4,800 px > 1,000


def test_cmyk_jpeg_of_a_grey_slice_reads_as_grey():
    buf = io.BytesIO()
    Image.fromarray(_head()).convert("CMYK").save(buf, format="JPEG", quality=95)
    out = decode_image(buf.getvalue())
    assert out.mode == "CMYK" and not out.is_colour and out.pixels.shape == (60, 80)


def test_crop_pad_margin_past_the_frame_is_padding():
    cfg = PreprocessConfig(image_size=32, geometry="crop_pad", crop_margin=0.1)
    touching = np.zeros((50, 50), np.uint8)
    touching[0:50, 5:45] = 100  # the head touches the top and bottom of a square frame
    wider = np.zeros((50, 90), np.uint8)
    wider[:, 20:70] = touching
    np.testing.assert_array_equal(preprocess(touching, cfg)[0], preprocess(wider, cfg)[0])

"""The OpenCV JPEG path of decode_any gives exactly Pillow's pixels, or steps aside for Pillow. The reference is
written here in Pillow and numpy alone: none of the decoder's code (its grey-or-colour rule included) decides what the
right answer is."""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from braintumor.train import decode
from braintumor.train.decode import DecodedImage, ImageDecodeError, decode_any

# An RGB image is a grey slice stored as RGB when its channels differ by at most this many levels on average (JPEG
# chroma noise); otherwise it is a colour photo, read as Pillow's luma.
GREY_SPREAD = 2.0


def _jpeg(arr: np.ndarray, orientation: int = 1, mode: str | None = None, **options) -> bytes:
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), **({"quality": 90} | options))
    return buf.getvalue()


def _slice(h: int = 48, w: int = 72) -> np.ndarray:
    """An asymmetric, non-square slice: every flip and rotation gives a different array."""
    yy, xx = np.mgrid[:h, :w]
    img = (40 + 2 * xx + yy).astype(np.uint8)
    img[5:15, 8:30] = 250
    return img


def _pillow_reference(data: bytes) -> DecodedImage:
    """What decode_any must give, by Pillow and numpy alone: Pillow's decoder, Pillow's exif_transpose, and the grey
    rule restated with numpy (mean absolute difference of R-G and G-B within GREY_SPREAD: the red channel; beyond
    it: Pillow's convert("L"))."""
    with Image.open(io.BytesIO(data)) as img:
        mode = img.mode
        turned = ImageOps.exif_transpose(img)
    if turned.mode == "L":
        return DecodedImage(np.asarray(turned), mode, False)
    rgb = np.asarray(turned.convert("RGB")).astype(np.int16)
    spread = max(np.abs(rgb[..., 0] - rgb[..., 1]).mean(), np.abs(rgb[..., 1] - rgb[..., 2]).mean())
    if spread <= GREY_SPREAD:
        return DecodedImage(np.ascontiguousarray(rgb[..., 0].astype(np.uint8)), mode, False)
    return DecodedImage(np.asarray(turned.convert("L")), mode, True)


@pytest.fixture
def pillow_only():
    """The right answer for an image, computed without the decoder (:func:`_pillow_reference`)."""
    return _pillow_reference


@pytest.fixture
def opencv_used(monkeypatch):
    """Records whether the OpenCV path answered (not None) for each decode."""
    answered: list[bool] = []
    real = decode._jpeg_grey

    def spy(data, img):
        out = real(data, img)
        answered.append(out is not None)
        return out

    monkeypatch.setattr(decode, "_jpeg_grey", spy)
    return answered


def _same(a, b) -> None:
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert (a.mode, a.is_colour, a.pixels.dtype) == (b.mode, b.is_colour, b.pixels.dtype)
    assert a.pixels.flags.c_contiguous


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("channels", ["L", "RGB"])
def test_every_exif_orientation_gives_pillows_pixels(orientation, channels, pillow_only, opencv_used):
    data = _jpeg(_slice(), orientation, channels)
    got = decode_any(data)[0]
    assert opencv_used == [True]
    _same(got, pillow_only(data))
    assert got.pixels.shape == ((72, 48) if orientation >= 5 else (48, 72))


@pytest.mark.parametrize("options", [{"progressive": True}, {"subsampling": 0}, {"subsampling": 2, "optimize": True},
                                     {"quality": 40, "restart_marker_blocks": 1}])
def test_encodings_decode_to_pillows_pixels(options, pillow_only, opencv_used):
    """Progressive, 4:4:4 and 4:2:0 chroma, optimised Huffman tables, restart markers: one decoder, one answer."""
    data = _jpeg(_slice(), 6, "RGB", **options)
    got = decode_any(data)[0]
    assert opencv_used == [True]
    _same(got, pillow_only(data))


@pytest.mark.parametrize("orientation", [3, 6, 7])
def test_a_png_with_an_exif_orientation_is_turned_as_pillow_turns_it(orientation, pillow_only, opencv_used):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(_slice()).save(buf, format="PNG", exif=exif.tobytes())
    got = decode_any(buf.getvalue())[0]
    assert opencv_used == [False] and got.pixels.shape == ((72, 48) if orientation >= 5 else (48, 72))
    _same(got, pillow_only(buf.getvalue()))


def test_a_colour_photo_keeps_pillows_luma(pillow_only, opencv_used):
    photo = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    data = _jpeg(photo)
    got = decode_any(data)[0]
    assert opencv_used == [False] and got.is_colour
    _same(got, pillow_only(data))


@pytest.mark.parametrize("tint, colour", [(0, False), (2, False), (3, True), (40, True)])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_grey_or_colour_is_decided_at_the_stated_spread(tint, colour, fmt, pillow_only):
    """An RGB slice whose green channel is ``tint`` levels above red and blue: grey up to GREY_SPREAD, colour beyond
    (PNG keeps the tint exact; JPEG's chroma rounding moves it a little, hence 0/2 vs 3 only as PNG)."""
    grey = _slice().astype(np.int16)
    rgb = np.stack([grey, np.clip(grey + tint, 0, 255), grey], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}))
    got, want = decode_any(buf.getvalue())[0], pillow_only(buf.getvalue())
    _same(got, want)
    if fmt == "PNG" or tint in (0, 40):
        assert got.is_colour is colour


def test_a_truncated_jpeg_is_still_refused(opencv_used):
    data = _jpeg(_slice(96, 96))
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_any(data[: len(data) * 2 // 3])
    assert opencv_used == [False]  # no EOI marker: Pillow's decoder, which refuses it (libjpeg would fill grey)


@pytest.mark.parametrize("variant", ["trailing bytes", "CMYK"])
def test_other_jpegs_go_through_pillow_unchanged(variant, pillow_only, opencv_used):
    data = _jpeg(_slice(), mode="CMYK") if variant == "CMYK" else _jpeg(_slice()) + b"\x00" * 7
    got = decode_any(data)[0]
    assert opencv_used == [False]
    _same(got, pillow_only(data))


def test_real_brisc_jpegs_decode_as_pillow_decodes_them(real_data, pillow_only, opencv_used):
    """A spread of the train split, and its EXIF-rotated files (orientations 3 and 8 occur in BRISC); every one of
    the 8,933 JPEGs was compared once when the path went in."""
    paths = sorted(real_data.rglob("*.jpg"))
    rotated = []
    for path in paths:
        with Image.open(path) as img:
            if img.getexif().get(0x0112, 1) != 1:
                rotated.append(path)
    chosen = paths[::40] + rotated[::10]
    assert len(rotated) > 100
    for path in chosen:
        data = path.read_bytes()
        _same(decode_any(data)[0], pillow_only(data))
    assert all(opencv_used[: len(chosen)])

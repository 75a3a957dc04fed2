"""Fuzzing every decoder entry point: arbitrary bytes, truncations and mutations of real JPEG, PNG and DICOM files
either decode to a greyscale uint8 slice or raise :class:`ImageDecodeError` (the caller's fault: 400 / 415 over the
wire), never any other exception (a 500).

The default suite runs a bounded, derandomised number of examples; ``-m slow`` runs many more with fresh randomness.
"""

import io

import numpy as np
import pytest
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from braintumor.train.decode import (  # noqa: E402
    DecodedImage, ImageDecodeError, decode_any, decode_dicom, decode_image, decode_mask, is_dicom,
)

QUICK = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=4000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _slice(size=(48, 40)) -> np.ndarray:
    yy, xx = np.mgrid[0:size[0], 0:size[1]]
    head = (((yy - size[0] / 2) / (size[0] * 0.45)) ** 2 + ((xx - size[1] / 2) / (size[1] * 0.45)) ** 2) <= 1.0
    return (np.where(head, 120, 0) + (yy % 7) * 9).astype(np.uint8)


def _encoded(fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_slice()).save(buf, format=fmt, **save)
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    from braintumor.train.synthetic import synthetic_dicom

    pixels = (_slice().astype(np.uint16) * 7)
    return {
        "jpeg": _encoded("JPEG", quality=90),
        "jpeg_progressive": _encoded("JPEG", quality=90, progressive=True),
        "png": _encoded("PNG"),
        "png_rgb": (lambda b: (Image.fromarray(_slice()).convert("RGB").save(b, format="PNG"), b.getvalue())[1])(
            io.BytesIO()),
        "dicom": synthetic_dicom(pixels, 12, PixelSpacing=[0.5, 0.5]),
    }


SEEDS = _seeds()


def _outcome(call, data: bytes) -> None:
    """``call(data)`` decodes to a sane slice or raises ImageDecodeError; anything else fails the test."""
    try:
        result = call(data)
    except ImageDecodeError as exc:
        assert str(exc), "a refusal must say why"
        return
    image = result[0] if isinstance(result, tuple) else result
    if isinstance(image, DecodedImage):
        image = image.pixels
    assert image.dtype == np.uint8 and image.ndim == 2 and min(image.shape) >= 1


ENTRY_POINTS = {
    "decode_any": decode_any,
    "decode_image": decode_image,
    "decode_mask": decode_mask,
    "decode_dicom": decode_dicom,
}


@st.composite
def mutated(draw) -> bytes:
    """A real file, truncated at any point and/or with a few bytes overwritten (the header mostly: that is where a
    parser decides what to allocate and which path to take)."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 6))):
        # mostly in the first 512 bytes (headers, DICOM's meta group), sometimes anywhere
        limit = len(data) - 1 if draw(st.booleans()) else min(len(data) - 1, 511)
        data[draw(st.integers(0, limit))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


ANY_BYTES = st.binary(min_size=0, max_size=4096)
SHORT_PREFIXES = st.sampled_from(sorted(SEEDS)).flatmap(lambda k: st.integers(0, 24).map(lambda n: SEEDS[k][:n]))
CORPUS = st.one_of(ANY_BYTES, mutated(), SHORT_PREFIXES)


def _check_all_entry_points(data: bytes) -> None:
    for call in ENTRY_POINTS.values():
        _outcome(call, data)
    assert isinstance(is_dicom(data), bool)


@QUICK
@given(CORPUS)
def test_every_decoder_entry_point_refuses_or_decodes(data):
    _check_all_entry_points(data)


@pytest.mark.slow
@LONG
@given(CORPUS)
def test_every_decoder_entry_point_refuses_or_decodes_long(data):
    _check_all_entry_points(data)


@pytest.mark.parametrize("data", [b"vm\n", b"a", b"ab", b"\x89P", b"\xff\xd8\xff", b"GIF", b"II*", b"BM", b"DICM"],
                         ids=repr)
def test_one_to_four_bytes_are_a_clear_refusal(data):
    """What an outside probe found: 1-3 bytes made Pillow's BMP accept() raise struct.error (a 500)."""
    with pytest.raises(ImageDecodeError, match="send a JPEG, PNG or DICOM|not accepted"):
        decode_any(data)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_the_seeds_themselves_decode(name):
    """The fuzzer's seeds are real files that decode: mutations start from something the decoder accepts."""
    pixels = decode_image(SEEDS[name]).pixels
    assert pixels.shape == _slice().shape

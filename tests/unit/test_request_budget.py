"""Bounded work per request (issue 13): only JPEG, PNG and DICOM are decoded, the size budget is checked on the
header, and the memory one request costs stays within REQUEST_MEMORY_BUDGET for the worst accepted shapes."""

import io
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from braintumor.serving.errors import BadInput, UnsupportedMediaType
from braintumor.serving.pipeline import Pipeline
from braintumor.export.model_contract import ModelContract
from braintumor.serving.backend import ModelInfo
from braintumor.serving.triton_client import TritonModel
from braintumor.train.decode import MAX_SIDE, ImageDecodeError, UnsupportedFormatError, decode_image
from braintumor.train.preprocess import Geometry, PreprocessConfig, compute_geometry, invert_geometry
from braintumor.train.synthetic import synthetic_dicom

# Measured peak RSS growth of decode -> preprocess -> postprocess (mask, heatmap, overlay PNGs) at 2048x2048:
# grey PNG 77 MB, 16-bit PNG 78 MB, colour JPEG 89 MB, 16-bit DICOM 168 MB; a 512x512 slice 8 MB.
REQUEST_MEMORY_BUDGET = 200e6
SLICE_MEMORY_BUDGET = 20e6


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


GREY = np.full((24, 24), 120, np.uint8)


@pytest.mark.parametrize("fmt, mode", [("GIF", "L"), ("TIFF", "L"), ("BMP", "L"), ("WEBP", "L"), ("PPM", "L"),
                                       ("EPS", "RGB"), ("ICO", "RGB"), ("JPEG2000", "RGB")])
def test_formats_other_than_jpeg_png_dicom_are_refused_by_name(fmt, mode):
    data = _encode(np.asarray(Image.fromarray(GREY).convert(mode)), fmt)
    with pytest.raises(UnsupportedFormatError, match=f"{fmt} images are not accepted; send a JPEG, PNG or DICOM"):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_jpeg_and_png_are_decoded(fmt):
    assert decode_image(_encode(GREY, fmt)).pixels.shape == GREY.shape


def _pipeline() -> Pipeline:
    # A real TritonModel; nothing here connects (it connects on first use), decoding needs no Triton.
    return Pipeline(TritonModel("127.0.0.1:1", "brain_tumor"), warm_explainers=False)


def _info() -> ModelInfo:
    return ModelInfo("brain_tumor", "1", ModelContract(("a", "b"), PreprocessConfig(image_size=32), cam_size=1), 8)


def test_pipeline_answers_415_for_another_format_and_400_for_garbage():
    with pytest.raises(UnsupportedMediaType) as refused:
        _pipeline().prepare(_encode(GREY, "GIF"), _info())
    assert refused.value.http_status == 415 and "GIF" in refused.value.message
    with pytest.raises(BadInput) as bad:
        _pipeline().prepare(b"not an image at all", _info())
    assert bad.value.http_status == 400


@pytest.mark.parametrize("width, height", [(20000, 20), (20, 20000), (MAX_SIDE + 1, 64), (64, MAX_SIDE + 1)])
def test_a_side_over_the_budget_is_refused_from_the_header(width, height):
    """The issue's 613-byte 20000x20 PNG cost 4.4 GB and 13 s; it is refused before a pixel is decoded."""
    data = _encode(np.full((height, width), 200, np.uint8), "PNG")
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=f"at most {MAX_SIDE} pixels on a side"):
        decode_image(data)
    assert time.perf_counter() - start < 0.5


def _invert_via_full_square(square: np.ndarray, geom: Geometry) -> np.ndarray:
    """The former inverse: resize to the whole padded square, then cut the crop out."""
    y0, y1, x0, x1 = geom.crop
    top, bottom, left, right = geom.pad
    ch, cw = y1 - y0, x1 - x0
    full = np.asarray(Image.fromarray(square).resize((cw + left + right, ch + top + bottom), Image.BILINEAR))
    out = np.zeros(geom.original_shape, np.uint8)
    out[y0:y1, x0:x1] = full[top:top + ch, left:left + cw]
    return out


@pytest.mark.parametrize("geometry", ["crop_pad", "pad", "resize"])
def test_inverse_geometry_without_the_padded_square_gives_the_same_map(geometry):
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(8, 600, 2))
        image = np.zeros((h, w), np.uint8)
        y0, y1 = sorted(int(v) for v in rng.integers(0, h, 2))
        x0, x1 = sorted(int(v) for v in rng.integers(0, w, 2))
        image[y0:y1 + 1, x0:x1 + 1] = 150
        cfg = PreprocessConfig(image_size=int(rng.choice([32, 256])), geometry=geometry)
        geom = compute_geometry(image, cfg)
        square = rng.integers(0, 256, (cfg.image_size, cfg.image_size), dtype=np.uint8)
        new, old = invert_geometry(square, geom).astype(int), _invert_via_full_square(square, geom).astype(int)
        assert np.abs(new - old).max() <= 1, f"{(h, w)} {geom}"  # Pillow's fixed-point rounding: one grey level


# -- peak memory, measured in a fresh interpreter per image (freed memory of one case would hide the next) ---------
PEAK_SCRIPT = r'''
import io, sys, numpy as np
from PIL import Image
from braintumor.train.decode import decode_any
from braintumor.train.preprocess import PreprocessConfig, preprocess
from braintumor.serving.postprocess import postprocess
from braintumor.serving.request import AnalyzeOptions
from braintumor.train.refer import ReferRules

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

S = 256
cfg = PreprocessConfig(image_size=S)
outputs = {"class_probs": np.full((1, 4), 0.25, np.float32),
           "mask_prob": np.random.default_rng(0).random((1, 1, S, S), dtype=np.float32),
           "cam": np.random.default_rng(1).random((1, 4, 8, 8), dtype=np.float32)}

def run(data):
    decoded, _ = decode_any(data)
    _, geom = preprocess(decoded.pixels, cfg)
    postprocess(outputs, geom, decoded, classes=list("abcd"), rules=ReferRules(0.5),
                options=AnalyzeOptions(heatmap=True, overlay=True))  # the worst case: every PNG asked for

warm = io.BytesIO()
Image.fromarray(np.full((64, 64), 100, np.uint8)).save(warm, format="PNG")
run(warm.getvalue())  # imports and first-call allocations are not the request's
data = sys.stdin.buffer.read()
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the high-water mark to the current RSS
run(data)
print(status("VmHWM") - base)
'''


def _peak_bytes(data: bytes) -> int:
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], input=data, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return int(result.stdout)


def _dicom16(side: int) -> bytes:
    pytest.importorskip("pydicom")
    pixels = np.random.default_rng(0).integers(0, 4000, (side, side), dtype=np.uint16)
    return synthetic_dicom(pixels, 16, RescaleSlope=2, RescaleIntercept=-100)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_peak_memory_of_the_worst_accepted_shapes_is_within_budget():
    rng = np.random.default_rng(0)
    side = MAX_SIDE
    worst = {
        "grey PNG": _encode(rng.integers(0, 256, (side, side), dtype=np.uint8), "PNG", compress_level=1),
        "16-bit PNG": _encode(rng.integers(0, 65536, (side, side), dtype=np.uint16), "PNG", compress_level=1),
        "colour JPEG": _encode(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "JPEG", quality=90),
        "16-bit DICOM": _dicom16(side),
        "thin PNG": _encode(np.full((8, side), 150, np.uint8), "PNG"),
    }
    peaks = {name: _peak_bytes(data) for name, data in worst.items()}
    over = {name: f"{peak / 1e6:.0f} MB" for name, peak in peaks.items() if peak > REQUEST_MEMORY_BUDGET}
    assert not over, f"over the {REQUEST_MEMORY_BUDGET / 1e6:.0f} MB budget: {over}"
    slice_peak = _peak_bytes(_encode(rng.integers(0, 256, (512, 512), dtype=np.uint8), "PNG"))
    assert slice_peak < SLICE_MEMORY_BUDGET, f"a 512x512 slice took {slice_peak / 1e6:.0f} MB"

"""SDK without a server: the error tables, what an image becomes on the wire, and the result helpers."""

import base64
import io
import pickle

import numpy as np
import pytest
from PIL import Image

from braintumor.clients import errors
from braintumor.clients._images import image_bytes
from braintumor.clients.results import Analysis, Explanation
from braintumor.clients.v1 import braintumor_pb2 as pb


@pytest.mark.parametrize("status, cls", [
    (400, errors.InvalidInputError), (413, errors.InvalidInputError), (415, errors.InvalidInputError),
    (422, errors.InvalidInputError), (401, errors.AuthenticationError), (403, errors.AuthenticationError),
    (404, errors.NotFoundError), (429, errors.OverloadedError), (502, errors.UnavailableError),
    (503, errors.UnavailableError), (504, errors.DeadlineExceededError), (500, errors.ServerError),
    (501, errors.ServerError), (418, errors.BrainTumorError),
])
def test_http_status_maps_to_exception(status, cls):
    exc = errors.http_error(status, "what to fix", "bad_input")
    assert type(exc) is cls
    assert (exc.status, exc.code, exc.detail) == (status, "bad_input", "what to fix")


@pytest.mark.parametrize("code, cls", [
    ("INVALID_ARGUMENT", errors.InvalidInputError), ("UNAUTHENTICATED", errors.AuthenticationError),
    ("PERMISSION_DENIED", errors.AuthenticationError), ("RESOURCE_EXHAUSTED", errors.OverloadedError),
    ("UNAVAILABLE", errors.UnavailableError), ("DEADLINE_EXCEEDED", errors.DeadlineExceededError),
    ("NOT_FOUND", errors.NotFoundError), ("INTERNAL", errors.ServerError), ("UNKNOWN", errors.ServerError),
    ("CANCELLED", errors.BrainTumorError),
])
def test_grpc_code_maps_to_exception(code, cls):
    exc = errors.grpc_error(code, "detail")
    assert type(exc) is cls and exc.status is None and exc.code == code and exc.detail == "detail"


def test_message_size_limit_is_invalid_input_not_overload():
    exc = errors.grpc_error("RESOURCE_EXHAUSTED", "Received message larger than max (30000000 vs. 21037056)")
    assert isinstance(exc, errors.InvalidInputError)


def test_error_text_and_pickling():
    exc = errors.http_error(503, "Triton is down", "unavailable")
    assert str(exc) == "503 unavailable: Triton is down"
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is errors.UnavailableError and (again.status, again.code, again.detail) == (503, "unavailable",
                                                                                                   "Triton is down")


# -- images -----------------------------------------------------------------------------------------------------

def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("array", [
    np.arange(48 * 40, dtype=np.uint32).reshape(48, 40).astype(np.uint8),
    (np.arange(48 * 40).reshape(48, 40) * 31).astype(np.uint16),
    (np.arange(48 * 40).reshape(48, 40) * 31).astype(">u2"),
    np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8),
])
def test_arrays_are_sent_as_lossless_png(array):
    data = image_bytes(array)
    assert data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(_decode(data), array)


def test_single_channel_array_is_squeezed():
    array = np.full((16, 12, 1), 7, np.uint8)
    np.testing.assert_array_equal(_decode(image_bytes(array)), array[:, :, 0])


@pytest.mark.parametrize("array", [np.zeros((8, 8), np.float32), np.zeros((8, 8, 4), np.uint8),
                                   np.zeros((8, 8, 3), np.uint16), np.zeros(8, np.uint8), np.zeros((0, 8), np.uint8)])
def test_unusable_arrays_say_what_is_accepted(array):
    with pytest.raises(ValueError, match="2-D"):
        image_bytes(array)


def test_paths_and_bytes(tmp_path):
    path = tmp_path / "slice.jpg"
    path.write_bytes(b"jpeg bytes")
    assert image_bytes(path) == image_bytes(str(path)) == image_bytes(b"jpeg bytes") == b"jpeg bytes"
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        image_bytes(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="empty"):
        image_bytes(b"")
    with pytest.raises(TypeError, match="file path"):
        image_bytes(3.5)


# -- results ----------------------------------------------------------------------------------------------------

def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


MASK = np.zeros((6, 5), np.uint8)
MASK[2:4, 1:3] = 255
HEATMAP = np.zeros((6, 5, 3), np.uint8)


def _message(**kw) -> pb.AnalyzeResponse:
    fields = dict(id="0", label="glioma", probabilities={"glioma": 0.9, "no_tumor": 0.1}, refer=True,
                  refer_reason=["low confidence", "colour image"], tumor_area_px=4, image_height=6, image_width=5,
                  mask_png=_png(MASK), heatmap_png=_png(HEATMAP), model=pb.ModelRef(name="brain_tumor", version="3"))
    return pb.AnalyzeResponse(**{**fields, **kw})


def _json(message: pb.AnalyzeResponse) -> dict:
    b64 = lambda data: base64.b64encode(data).decode() if data else None  # noqa: E731
    return {"label": message.label, "probabilities": dict(message.probabilities), "refer": message.refer,
            "refer_reason": list(message.refer_reason), "tumor_area_px": message.tumor_area_px,
            "tumor_area_mm2": None, "mask_label_disagree": False, "image_height": 6, "image_width": 5,
            "mask_png": b64(message.mask_png), "heatmap_png": b64(message.heatmap_png), "overlay_png": None,
            "model": {"name": "brain_tumor", "version": "3"}}


def test_both_wire_formats_give_equal_analyses():
    message = _message()
    from_grpc, from_http = Analysis.from_message(message), Analysis.from_json(_json(message))
    assert from_grpc == from_http
    assert from_grpc.refer_reason == "low confidence; colour image"
    assert from_grpc.refer_reasons == ("low confidence", "colour image")
    assert (from_grpc.model_name, from_grpc.model_version, from_grpc.tumor_area_mm2) == ("brain_tumor", "3", None)
    assert Analysis.from_message(_message(tumor_area_mm2=1.5)).tumor_area_mm2 == 1.5
    assert Analysis.from_message(_message(refer=False, refer_reason=[])).refer_reason is None


def test_analysis_helpers(tmp_path):
    analysis = Analysis.from_message(_message())
    mask = analysis.mask_array()
    assert mask.dtype == bool and mask.shape == (6, 5) and mask.sum() == 4
    buf = io.BytesIO()
    Image.fromarray(MASK > 0).save(buf, format="PNG")  # a 1-bit PNG: np.asarray of it is bool, not 0/255
    one_bit = Analysis.from_message(_message(mask_png=buf.getvalue()))
    np.testing.assert_array_equal(one_bit.mask_array(), mask)
    assert analysis.save_mask(tmp_path / "m.png").read_bytes() == analysis.mask_png
    assert analysis.save_heatmap(tmp_path / "h.png").read_bytes() == analysis.heatmap_png
    with pytest.raises(ValueError, match="overlay=True"):
        analysis.save_overlay(tmp_path / "o.png")
    row = analysis.to_dict()
    assert "mask_png" not in row and row["label"] == "glioma" and row["model_version"] == "3"
    import json

    with_images = json.loads(json.dumps(analysis.to_dict(images=True)))
    assert base64.b64decode(with_images["mask_png"]) == analysis.mask_png and with_images["overlay_png"] is None


def test_explanation_from_both_formats(tmp_path):
    message = pb.ExplainResponse(method="lime", target="glioma", label="glioma", probabilities={"glioma": 1.0},
                                 num_samples=20, seconds=1.25, cached=True, image_height=6, image_width=5,
                                 heatmap_png=_png(HEATMAP), overlay_png=_png(HEATMAP),
                                 model=pb.ModelRef(name="brain_tumor", version="3"))
    body = {"method": "lime", "target": "glioma", "label": "glioma", "probabilities": {"glioma": 1.0},
            "num_samples": 20, "seconds": 1.25, "cached": True, "image_height": 6, "image_width": 5,
            "heatmap_png": base64.b64encode(message.heatmap_png).decode(),
            "overlay_png": base64.b64encode(message.overlay_png).decode(),
            "model": {"name": "brain_tumor", "version": "3"}}
    explanation = Explanation.from_message(message)
    assert explanation == Explanation.from_json(body)
    assert explanation.save(tmp_path / "e.png").read_bytes() == message.heatmap_png
    assert explanation.heatmap_array().shape == (6, 5, 3)
    assert explanation.to_dict()["num_samples"] == 20

"""The BentoML HTTP gateway as deployed: `bentoml serve braintumor.serving.service:BrainTumorGateway` in a subprocess
against the embedded Triton with the tiny model. Multipart, JSON and the pipeline agree; a batch fails only its bad
image; each bad input is a 4xx saying what to fix and the service stays up; explanations (also as a BentoML task);
metrics move; the API key guards the API but not the probes; a Triton that is down is a fast 503 and not ready."""

import asyncio
import base64
import io
import re
import struct
import time
import zlib

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("bentoml")
pytest.importorskip("tritonclient.grpc.aio")

from PIL import Image  # noqa: E402

from braintumor.serving.pipeline import Pipeline  # noqa: E402
from braintumor.serving.request import AnalyzeOptions  # noqa: E402
from braintumor.serving.settings import ServeSettings  # noqa: E402
from braintumor.serving.triton_embedded import free_port  # noqa: E402
from braintumor.train.synthetic import synthetic_dicom  # noqa: E402

pytestmark = pytest.mark.integration

MAX_BODY = 1_000_000
MAX_BATCH = 4
LIMITS = {"BRAINTUMOR_MAX_BODY_BYTES": str(MAX_BODY), "BRAINTUMOR_MAX_BATCH_IMAGES": str(MAX_BATCH)}
PATIENT_FILE = "Doe^Jane_PID-98765.jpg"  # a file name that must never reach the logs


@pytest.fixture(scope="module")
def gateway(tiny_triton, tmp_path_factory, running_gateway):
    with running_gateway(tmp_path_factory.mktemp("gateway"), tiny_triton, **LIMITS) as gw:
        yield gw


def _files(data: bytes, name: str = "slice.jpg", field: str = "image", kind: str = "image/jpeg") -> dict:
    return {field: (name, data, kind)}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _explain_available() -> bool:
    try:
        import braintumor.serving.explain  # noqa: F401
    except ImportError:
        return False
    return True


needs_explain = pytest.mark.skipif(not _explain_available(), reason="serving/explain.py (LIME/SHAP) is not there yet")


# -- images for the bad-input table ------------------------------------------------------------------------------

def _png(array_or_image, **save) -> bytes:
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save)
    return buf.getvalue()


def _slice_pixels(slice_jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(slice_jpeg)).convert("L"))


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height over a few bytes of data: refused before anything is allocated."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _dicom_without_pixels() -> bytes:
    pydicom = pytest.importorskip("pydicom")
    data = synthetic_dicom(None, PatientName="Doe^Jane", Rows=16, Columns=16, SamplesPerPixel=1,
                           PhotometricInterpretation="MONOCHROME2")
    assert pydicom.dcmread(io.BytesIO(data)).get("PixelData") is None
    return data


def _multipart(data: bytes) -> dict:
    return {"files": _files(data)}


def _json(**body) -> dict:
    return {"json": body}


# (case, path, request kwargs built from the slice, expected status, fragment of the detail)
BAD_INPUTS = [
    ("empty body", "/analyze", lambda s: {"content": b"", "headers": {"content-type": "application/json"}}, 400,
     "no image in the request"),
    ("empty file", "/analyze", lambda s: _multipart(b""), 400, "empty image"),
    ("truncated JPEG", "/analyze", lambda s: _multipart(s[: len(s) // 2]), 400, "truncated"),
    ("text file", "/analyze", lambda s: {"files": _files(b"patient notes, not an image", "notes.txt", "text/plain")},
     400, "JPEG, PNG or DICOM"),
    ("decompression bomb", "/analyze", lambda s: _multipart(_png(Image.new("1", (9000, 9000)))), 400, "too large"),
    ("PNG header claiming 30000x30000", "/analyze", lambda s: _multipart(_png_claiming(30000, 30000)), 400,
     "too large"),
    ("1x1 image", "/analyze", lambda s: _multipart(_png(np.zeros((1, 1), np.uint8))), 400, "at least 8x8"),
    ("DICOM without pixel data", "/analyze", lambda s: _multipart(_dicom_without_pixels()), 400, "no PixelData"),
    ("invalid base64", "/analyze", lambda s: _json(image_base64="not base64 at all!"), 400, "not valid base64"),
    ("invalid JSON", "/analyze", lambda s: {"content": b'{"image_base64": ', "headers": {
        "content-type": "application/json"}}, 400, "Invalid JSON"),
    ("unknown JSON field", "/analyze", lambda s: _json(picture=_b64(s)), 400, "picture: Extra inputs"),
    ("base64 in the file field", "/analyze", lambda s: _json(image=_b64(s)), 400, "image_base64"),
    ("wrong multipart field", "/analyze", lambda s: {"files": _files(s, field="file")}, 400, "unknown field 'file'"),
    ("two files for one image", "/analyze", lambda s: {"files": [("image", ("a.jpg", s)), ("image", ("b.jpg", s))]},
     400, "one file"),
    ("multipart without boundary", "/analyze", lambda s: {"content": s, "headers": {
        "content-type": "multipart/form-data"}}, 400, "boundary"),
    ("raw image body", "/analyze", lambda s: {"content": s, "headers": {"content-type": "image/jpeg"}}, 415,
     "multipart/form-data"),
    ("oversized body", "/analyze", lambda s: _json(image_base64="A" * (MAX_BODY + 16)), 413, "limit"),
    ("image and base64 both", "/analyze", lambda s: {"files": _files(s), "data": {"image_base64": _b64(s)}}, 400,
     "once"),
    ("too many batch images", "/analyze_batch", lambda s: _json(images_base64=[_b64(s)] * (MAX_BATCH + 1)), 400,
     f"at most {MAX_BATCH}"),
    ("unknown explain method", "/explain", lambda s: {"files": _files(s), "data": {"method": "saliency"}}, 400,
     "gradcam, lime, shap"),
    ("absurd num_samples", "/explain", lambda s: _json(image_base64=_b64(s), method="lime", num_samples=10**9), 400,
     "outside 10.."),
    ("unknown target class", "/explain", lambda s: _json(image_base64=_b64(s), target="astrocytoma"), 400,
     "unknown target class"),
    ("num_samples not a number", "/explain", lambda s: {"files": _files(s), "data": {"num_samples": "many"}}, 400,
     "num_samples"),
    ("heatmap flag not a boolean", "/analyze", lambda s: {"files": _files(s), "data": {"heatmap": "maybe"}}, 400,
     "heatmap"),
    ("heatmap flag not a boolean (JSON)", "/analyze_batch", lambda s: _json(images_base64=[_b64(s)], heatmap="maybe"),
     400, "heatmap"),
    ("unknown mask_format", "/analyze", lambda s: {"files": _files(s), "data": {"mask_format": "jpeg"}}, 400,
     "unknown mask_format 'jpeg'; use one of png, rle"),
    ("unknown mask_format (JSON)", "/analyze", lambda s: _json(image_base64=_b64(s), mask_format="RLE"), 400,
     "unknown mask_format 'RLE'; use one of png, rle"),
    ("unknown mask_format (batch)", "/analyze_batch", lambda s: {"files": [("images", ("a.jpg", s))],
                                                                  "data": {"mask_format": "coco"}}, 400,
     "unknown mask_format 'coco'; use one of png, rle"),
    ("unknown mask_format (batch, JSON)", "/analyze_batch", lambda s: _json(images_base64=[_b64(s)],
                                                                         mask_format="rle "),
     400, "unknown mask_format 'rle '; use one of png, rle"),
]


@pytest.mark.parametrize("case, path, build, status, fragment", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_4xx_that_says_what_to_fix(gateway, slice_jpeg, case, path, build, status, fragment):
    response = gateway.post(path, **build(slice_jpeg))
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"] != "internal", body
    assert fragment in body["detail"], body
    assert gateway.get("/healthz").status_code == 200


def test_inputs_accepted_by_design(gateway, slice_jpeg):
    """16-bit PNG (min-max scaled, like a DICOM without a window) and CMYK JPEG are read; a colour photo is read but
    flagged for a human (refer) with the reason."""
    pixels = _slice_pixels(slice_jpeg)
    sixteen = _png((pixels.astype(np.uint16) * 257))
    assert Image.open(io.BytesIO(sixteen)).mode.startswith("I;16")
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("CMYK").save(buf, format="JPEG")
    cmyk = buf.getvalue()
    yy, xx = np.mgrid[0:64, 0:56]
    photo = _png(np.stack([yy * 4, xx * 4, 255 - yy * 3], axis=-1).astype(np.uint8))

    for data in (sixteen, cmyk, photo):
        response = gateway.post("/analyze", files=_files(data, "x.png", kind="application/octet-stream"))
        assert response.status_code == 200, response.text
        assert (response.json()["image_height"], response.json()["image_width"]) == pixels.shape
    body = gateway.post("/analyze", json={"image_base64": _b64(photo)}).json()
    assert body["refer"] is True and any("colour" in reason for reason in body["refer_reason"])


def test_multipart_json_and_pipeline_agree(gateway, tiny_triton, slice_jpeg):
    multipart = gateway.post("/analyze", files=_files(slice_jpeg, PATIENT_FILE))
    as_json = gateway.post("/analyze", json={"image_base64": _b64(slice_jpeg), "overlay": True, "heatmap": True})
    with_heatmap = gateway.post("/analyze", files=_files(slice_jpeg, PATIENT_FILE), data={"heatmap": "true"})
    assert multipart.status_code == 200, multipart.text
    assert with_heatmap.status_code == 200, with_heatmap.text
    assert as_json.status_code == 200, as_json.text

    async def direct():
        pipe = Pipeline.from_settings(ServeSettings(triton_url=tiny_triton.grpc_url,
                                                    triton_key=tiny_triton.client_key))
        try:
            return await pipe.analyze(slice_jpeg, AnalyzeOptions(heatmap=True))
        finally:
            await pipe.close()

    expected = asyncio.run(direct())
    a, b = multipart.json(), as_json.json()
    assert a["label"] == b["label"] == expected.label
    assert a["probabilities"] == b["probabilities"]
    assert a["probabilities"] == pytest.approx(expected.probabilities, abs=1e-6)
    assert a["tumor_area_px"] == b["tumor_area_px"] == expected.tumor_area_px
    assert base64.b64decode(a["mask_png"]) == base64.b64decode(b["mask_png"]) == expected.mask_png
    assert a["overlay_png"] is None and base64.b64decode(b["overlay_png"]).startswith(b"\x89PNG")
    assert a["model"] == {"name": "brain_tumor", "version": "1"}
    # Explanations on demand: the heatmap only when asked, the same PNG by multipart and JSON.
    assert a["heatmap_png"] is None
    assert base64.b64decode(b["heatmap_png"]) == base64.b64decode(with_heatmap.json()["heatmap_png"]) \
        == expected.heatmap_png


def _mask_of(body: dict) -> np.ndarray:
    """The answer's mask as booleans: from the PNG, or from the RLE by pycocotools (any COCO reader's way)."""
    if body["mask_png"] is not None:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))).convert("L")) > 127
    from pycocotools import mask as coco

    return coco.decode(body["mask_rle"]).astype(bool)


def test_mask_format_rle_gives_the_png_mask(gateway, slice_jpeg):
    """/analyze and /analyze_batch, multipart and JSON: mask_format=rle answers mask_rle (no PNG) holding the mask
    the default PNG holds; the overlay outlines it either way."""
    png = gateway.post("/analyze", files=_files(slice_jpeg), data={"overlay": "true"})
    rle = gateway.post("/analyze", files=_files(slice_jpeg), data={"mask_format": "rle", "overlay": "true"})
    rle_json = gateway.post("/analyze", json={"image_base64": _b64(slice_jpeg), "mask_format": "rle"})
    for response in (png, rle, rle_json):
        assert response.status_code == 200, response.text
    png, rle, rle_json = png.json(), rle.json(), rle_json.json()
    assert png["mask_rle"] is None and png["mask_png"]
    height, width = png["image_height"], png["image_width"]
    assert rle["mask_png"] is None and rle["mask_rle"]["size"] == [height, width]
    assert isinstance(rle["mask_rle"]["counts"], str) and rle_json["mask_rle"] == rle["mask_rle"]
    expected = _mask_of(png)
    assert expected.shape == (height, width) and expected.sum() == png["tumor_area_px"]
    np.testing.assert_array_equal(_mask_of(rle), expected)
    assert rle["overlay_png"] == png["overlay_png"]
    assert (rle["label"], rle["probabilities"], rle["tumor_area_px"]) == (
        png["label"], png["probabilities"], png["tumor_area_px"])

    files = [("images", ("a.jpg", slice_jpeg, "image/jpeg")), ("images", ("b.txt", b"not an image", "text/plain"))]
    batch = gateway.post("/analyze_batch", files=files, data={"mask_format": "rle"})
    batch_json = gateway.post("/analyze_batch", json={"images_base64": [_b64(slice_jpeg)], "mask_format": "rle"})
    batch_png = gateway.post("/analyze_batch", json={"images_base64": [_b64(slice_jpeg)]})
    assert batch.status_code == batch_json.status_code == batch_png.status_code == 200, batch.text
    good, bad = batch.json()["results"]
    assert bad["error"] == "bad_input"
    for body in (good, batch_json.json()["results"][0]):
        assert body["mask_png"] is None and body["mask_rle"] == rle["mask_rle"]
        np.testing.assert_array_equal(_mask_of(body), expected)
    assert batch_png.json()["results"][0]["mask_png"] == png["mask_png"]


def test_batch_answers_each_image(gateway, slice_jpeg):
    files = [("images", ("a.jpg", slice_jpeg, "image/jpeg")), ("images", ("b.txt", b"not an image", "text/plain")),
             ("images", ("c.jpg", slice_jpeg, "image/jpeg"))]
    response = gateway.post("/analyze_batch", files=files)
    assert response.status_code == 200, response.text
    good, bad, again = response.json()["results"]
    assert bad["error"] == "bad_input" and "JPEG, PNG or DICOM" in bad["detail"]
    assert good["probabilities"] == again["probabilities"] and good["label"]

    as_json = gateway.post("/analyze_batch", json={"images_base64": [_b64(slice_jpeg), "%%%"]}).json()
    assert as_json["model"]["version"] == "1"
    assert as_json["results"][0]["probabilities"] == good["probabilities"]
    assert as_json["results"][1]["error"] == "bad_input" and "images_base64[1]" in as_json["results"][1]["detail"]


def test_model_info_and_docs(gateway):
    info = gateway.get("/model").json()
    assert info["name"] == "brain_tumor" and info["version"] == "1"
    assert info["classes"] == ["glioma", "meningioma", "pituitary", "no_tumor"]
    paths = gateway.get("/docs.json").json()["paths"]
    assert {"/analyze", "/analyze_batch", "/explain", "/explain/submit", "/explain/status", "/explain/get"} <= paths.keys()
    assert "text/html" in gateway.get("/").headers["content-type"]


@needs_explain
def test_explain_gradcam_and_perturbation_methods(gateway, slice_jpeg):
    gradcam = gateway.post("/explain", files=_files(slice_jpeg), data={"method": "gradcam"})
    assert gradcam.status_code == 200, gradcam.text
    body = gradcam.json()
    assert body["method"] == "gradcam" and base64.b64decode(body["heatmap_png"]).startswith(b"\x89PNG")
    for method, bound in (("lime", {"num_samples": 20}), ("shap", {"max_evals": 20})):
        response = gateway.post("/explain", json={"image_base64": _b64(slice_jpeg), "method": method, **bound})
        assert response.status_code == 200, response.text
        assert response.json()["method"] == method


@needs_explain
def test_lime_as_a_task(gateway, slice_jpeg):
    submitted = gateway.post("/explain/submit", json={"image_base64": _b64(slice_jpeg), "method": "lime",
                                                      "num_samples": 20, "target": "glioma"})
    assert submitted.status_code == 200, submitted.text
    task_id = submitted.json()["task_id"]
    deadline = time.monotonic() + 60
    while (status := gateway.get("/explain/status", params={"task_id": task_id}).json()["status"]) == "in_progress":
        assert time.monotonic() < deadline, "the LIME task did not finish"
        time.sleep(0.2)
    assert status == "completed"
    result = gateway.get("/explain/get", params={"task_id": task_id})
    assert result.status_code == 200 and result.json()["method"] == "lime" and result.json()["target"] == "glioma"


def test_task_with_bad_options_fails_with_the_reason(gateway, slice_jpeg):
    task_id = gateway.post("/explain/submit", files=_files(slice_jpeg), data={"method": "saliency"}).json()["task_id"]
    deadline = time.monotonic() + 30
    while (status := gateway.get("/explain/status", params={"task_id": task_id}).json()["status"]) == "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status == "failed"
    result = gateway.get("/explain/get", params={"task_id": task_id})
    assert result.status_code == 400 and "gradcam, lime, shap" in result.json()["detail"]
    missing = gateway.get("/explain/status", params={"task_id": "no-such-task"})
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


def _counter(text: str, endpoint: str, status: str) -> float:
    pattern = (r'^braintumor_requests_total\{(?=[^}]*endpoint="%s")(?=[^}]*frontend="http")(?=[^}]*status="%s")'
               r'[^}]*\} ([0-9.e+]+)$' % (endpoint, status))
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_count_requests(gateway, slice_jpeg):
    before = _counter(gateway.get("/metrics").text, "analyze", "200")
    assert gateway.post("/analyze", files=_files(slice_jpeg)).status_code == 200
    text = gateway.get("/metrics").text
    assert _counter(text, "analyze", "200") == before + 1
    assert "braintumor_images_total" in text and "braintumor_request_seconds_bucket" in text


def test_no_patient_data_in_logs(gateway, slice_jpeg):
    """File names, DICOM header values and image bytes sent here, answered or refused, never reach the gateway's log
    (whichever tests ran before: this one sends its own)."""
    import uuid

    sent = [gateway.post("/analyze", files=_files(slice_jpeg, PATIENT_FILE)),
            gateway.post("/analyze", files=_files(b"not an image", PATIENT_FILE)),
            gateway.post("/analyze", files=_files(b"patient notes, not an image", "notes.txt", "text/plain")),
            gateway.post("/analyze", files=_files(_dicom_without_pixels(), PATIENT_FILE, "application/dicom")),
            gateway.post("/analyze", json={"image_base64": _b64(slice_jpeg)}),
            gateway.post("/analyze", json={"image_base64": _b64(slice_jpeg), "overlay": "maybe"})]
    assert [r.status_code for r in sent] == [200, 400, 400, 400, 200, 400], [r.text for r in sent]
    # the access line of a last request, once written, follows the lines of those before it
    marker = f"/logged-{uuid.uuid4().hex}"
    assert gateway.get(marker).status_code == 404
    deadline = time.monotonic() + 30
    while marker not in (log := gateway.log.read_text(errors="replace")):
        assert time.monotonic() < deadline, "the gateway did not log the marker request"
        time.sleep(0.1)
    assert "Service braintumor initialized" in log and "POST /analyze 400" in log
    for secret in ("Doe^Jane", "PID-98765", "notes.txt", _b64(slice_jpeg)[:40]):
        assert secret not in log, secret


def test_api_key_guards_the_api_not_the_probes(tiny_triton, tmp_path, slice_jpeg, running_gateway):
    with running_gateway(tmp_path, tiny_triton, BRAINTUMOR_API_KEY="s3cret", **LIMITS) as gw:
        refused = gw.post("/analyze", files=_files(slice_jpeg))
        assert refused.status_code == 401 and refused.json()["error"] == "unauthenticated"
        assert "x-api-key" in refused.json()["detail"]
        assert gw.post("/analyze", files=_files(slice_jpeg), headers={"x-api-key": "wrong"}).status_code == 401
        assert gw.get("/explain/status", params={"task_id": "x"}).status_code == 401
        assert gw.get("/model").status_code == 401
        assert gw.post("/analyze", files=_files(slice_jpeg), headers={"x-api-key": "s3cret"}).status_code == 200
        assert gw.post("/analyze", files=_files(slice_jpeg),
                       headers={"authorization": "Bearer s3cret"}).status_code == 200
        for open_path in ("/healthz", "/livez", "/readyz", "/metrics"):
            assert gw.get(open_path).status_code == 200, open_path
        for docs in ("/docs.json", "/"):  # with a key, the docs need it too (issue 13)
            assert gw.get(docs).status_code == 401, docs
            assert gw.get(docs, headers={"x-api-key": "s3cret"}).status_code == 200, docs


def test_triton_down_is_a_fast_503_and_not_ready(tmp_path, slice_jpeg, running_gateway):
    with running_gateway(tmp_path, f"127.0.0.1:{free_port()}", ready=False, **LIMITS) as gw:
        assert gw.get("/readyz").status_code == 503
        t0 = time.monotonic()
        response = gw.post("/analyze", files=_files(slice_jpeg))
        assert time.monotonic() - t0 < 3.0, "requests must fail fast while Triton is down"
        assert response.status_code == 503 and response.json()["error"] == "unavailable"
        assert "Triton" in response.json()["detail"] and response.headers["retry-after"] == "1"
        assert gw.post("/analyze_batch", json={"images_base64": [_b64(slice_jpeg)]}).status_code == 503
        assert gw.get("/model").status_code == 503
        assert gw.get("/healthz").status_code == 200  # alive: it recovers by itself when Triton is back

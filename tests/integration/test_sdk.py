"""The SDK against the real front doors on the embedded Triton with the tiny model: the gRPC server in-process and
the BentoML gateway as `bentoml serve`, both with an API key. Both protocols give the same answers; arrays, paths and
bytes give the same answers; the key is sent; a wrong key is AuthenticationError, also for every image of a stream."""

import io

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc.aio")
pytest.importorskip("bentoml")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from braintumor.clients import (AuthenticationError, BrainTumorClient, InvalidInputError,  # noqa: E402
                                UnavailableError)
from braintumor.serving.settings import ServeSettings  # noqa: E402
from braintumor.serving.triton_embedded import free_port  # noqa: E402

pytestmark = pytest.mark.integration

KEY = "sdk-test-key"
CLASSES = {"glioma", "meningioma", "pituitary", "no_tumor"}


@pytest.fixture(scope="module")
def grpc_target(tiny_triton, grpc_in_thread):
    """`serve_grpc` with an API key in a thread with its own event loop (as `braintumor grpc-server` runs it)."""
    settings = ServeSettings(triton_url=tiny_triton.grpc_url, triton_key=tiny_triton.client_key, api_key=KEY)
    with grpc_in_thread(settings) as target:
        yield target


@pytest.fixture(scope="module")
def http_url(tiny_triton, tmp_path_factory, running_gateway):
    """`bentoml serve` of the gateway with an API key in its own process group; waits for /readyz."""
    with running_gateway(tmp_path_factory.mktemp("sdk_gateway"), tiny_triton, BRAINTUMOR_API_KEY=KEY) as gw:
        yield gw.url


@pytest.fixture(params=["grpc", "http"])
def client(request, grpc_target, http_url):
    url = grpc_target if request.param == "grpc" else http_url
    with BrainTumorClient(url, protocol=request.param, api_key=KEY, timeout=60) as sdk:
        yield sdk


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def test_analyze_path_bytes_and_array(client, slice_jpeg, tmp_path):
    path = tmp_path / "slice.jpg"
    path.write_bytes(slice_jpeg)
    from_bytes, from_path = client.analyze(slice_jpeg, overlay=True), client.analyze(path)
    assert from_bytes.label in CLASSES and from_bytes.model_name == "brain_tumor"
    assert from_bytes.probabilities == pytest.approx(from_path.probabilities, abs=1e-6)
    assert from_bytes.mask_array().shape == _pixels(slice_jpeg).shape
    assert from_bytes.overlay_png.startswith(b"\x89PNG") and from_path.overlay_png is None
    # The decoded pixels sent as an array (a lossless PNG) are the same image the server decoded from the JPEG.
    from_array = client.analyze(_pixels(slice_jpeg))
    assert from_array.probabilities == pytest.approx(from_bytes.probabilities, abs=1e-5)


def test_both_protocols_agree(grpc_target, http_url, slice_jpeg):
    with BrainTumorClient(grpc_target, api_key=KEY) as over_grpc, \
            BrainTumorClient(http_url, protocol="http", api_key=KEY) as over_http:
        a, b = over_grpc.analyze(slice_jpeg), over_http.analyze(slice_jpeg)
        ha, hb = over_grpc.analyze(slice_jpeg, heatmap=True), over_http.analyze(slice_jpeg, heatmap=True)
        assert over_grpc.model() | {"temperature": None} == over_http.model() | {"temperature": None}
    assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)
    assert (a.label, a.tumor_area_px, a.refer, a.mask_png) == (b.label, b.tumor_area_px, b.refer, b.mask_png)
    assert a.heatmap_png == b.heatmap_png == b""  # explanations on demand
    assert ha.heatmap_png == hb.heatmap_png and ha.heatmap_png.startswith(b"\x89PNG")


def test_mask_format_rle_reads_and_saves_as_the_png(client, slice_jpeg, tmp_path):
    png, rle = client.analyze(slice_jpeg), client.analyze(slice_jpeg, mask_format="rle")
    assert png.mask_rle is None and rle.mask_png == b"" and rle.mask_rle["size"] == [png.image_height, png.image_width]
    np.testing.assert_array_equal(rle.mask_array(), png.mask_array())
    assert rle.mask_array().shape == _pixels(slice_jpeg).shape and rle.mask_array().sum() == png.tumor_area_px
    assert rle.save_mask(tmp_path / "rle.png").read_bytes() == png.save_mask(tmp_path / "png.png").read_bytes()
    many = list(client.analyze_many([slice_jpeg, b"not an image at all"], mask_format="rle"))
    assert many[0].mask_rle == rle.mask_rle and isinstance(many[1], InvalidInputError)


def test_analyze_many_in_order_with_a_bad_image(client, slice_jpeg):
    images = [slice_jpeg, slice_jpeg, b"not an image at all", slice_jpeg]
    answers = list(client.analyze_many(images, concurrency=2))
    assert [type(a).__name__ for a in answers] == ["Analysis", "Analysis", "InvalidInputError", "Analysis"]
    assert "JPEG, PNG or DICOM" in answers[2].detail


def test_explain_gradcam_and_health(client, slice_jpeg):
    explanation = client.explain(slice_jpeg)
    assert explanation.method == "gradcam" and explanation.target in CLASSES
    assert explanation.heatmap_array().shape == (*_pixels(slice_jpeg).shape, 3)
    health = client.health()
    assert health.live and health.ready and health.model["name"] == "brain_tumor"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_wrong_key_is_an_authentication_error(protocol, grpc_target, http_url, slice_jpeg):
    url = grpc_target if protocol == "grpc" else http_url
    with BrainTumorClient(url, protocol=protocol, api_key="wrong") as sdk:
        with pytest.raises(AuthenticationError, match="API key"):
            sdk.analyze(slice_jpeg)
        answers = list(sdk.analyze_many([slice_jpeg] * 3))
        assert sdk.health().ready  # the probes are open
    assert all(isinstance(a, AuthenticationError) for a in answers), answers


def test_nothing_listening_is_unavailable_after_retries(slice_jpeg):
    with BrainTumorClient(f"127.0.0.1:{free_port()}", retries=1, timeout=5) as sdk:
        with pytest.raises(UnavailableError):
            sdk.analyze(slice_jpeg)
        assert not sdk.health().live
    with BrainTumorClient(f"127.0.0.1:{free_port()}", protocol="http", retries=1, timeout=5) as sdk:
        with pytest.raises(UnavailableError):
            sdk.analyze(slice_jpeg)


def test_local_input_errors(client, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        client.analyze(tmp_path / "nowhere.jpg")
    with pytest.raises(ValueError, match="2-D"):
        client.analyze(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(InvalidInputError):
        client.analyze(np.zeros((2, 2), np.uint8))  # a valid array the server refuses: too small

"""The gRPC API in-process against a real embedded Triton with the tiny model: answers equal the pipeline's, the
stream isolates a bad image, limits and deadlines give clear statuses, health/reflection/auth/metrics work, and a
Triton that is not there gives UNAVAILABLE and NOT_SERVING."""

import asyncio
import importlib.util
import io
import threading
import urllib.request

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("tritonclient.grpc.aio")
pytest.importorskip("grpc_reflection.v1alpha")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402
from PIL import Image  # noqa: E402

from braintumor.clients.v1 import braintumor_pb2 as pb  # noqa: E402
from braintumor.clients.v1 import braintumor_pb2_grpc as pb_grpc  # noqa: E402
from braintumor.serving.grpc_server import MESSAGE_MARGIN, message_limits, serve_grpc  # noqa: E402
from braintumor.serving.pipeline import Pipeline  # noqa: E402
from braintumor.serving.request import AnalyzeOptions  # noqa: E402
from braintumor.serving.settings import ServeSettings  # noqa: E402
from braintumor.serving.triton_embedded import free_port  # noqa: E402

pytestmark = pytest.mark.integration

BODY_LIMIT = 256 * 1024  # small, so the size limits are cheap to hit
SERVICE = "braintumor.v1.BrainTumor"
HAS_EXPLAIN = importlib.util.find_spec("braintumor.serving.explain") is not None


class ServerThread:
    """:func:`serve_grpc` on free ports in a thread with its own event loop, as the CLI runs it."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.port, self.metrics_port = free_port(), free_port()
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, name="grpc-server", daemon=True)
        self.thread.start()
        if not self.ready.wait(30) or self.error is not None:
            raise RuntimeError(f"the gRPC server did not start: {self.error!r}")
        _, send = message_limits(self.settings)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}",
                                             options=[("grpc.max_receive_message_length", send)])
        self.stub = pb_grpc.BrainTumorStub(self.channel)
        return self

    def _run(self) -> None:
        async def main():
            self.loop = asyncio.get_running_loop()
            self.stop = asyncio.Event()
            await serve_grpc(self.settings, self.port, host="127.0.0.1", metrics_port=self.metrics_port,
                             ready_event=self.ready, stop_event=self.stop, grace=1.0)

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported by __enter__
            self.error = exc
            self.ready.set()

    def __exit__(self, *exc_info) -> None:
        self.channel.close()
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)
        assert not self.thread.is_alive(), "the gRPC server did not stop"
        assert self.error is None, f"the gRPC server failed: {self.error!r}"

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def wait_health(self, want: int, timeout: float = 10.0) -> int:
        import time

        deadline = time.monotonic() + timeout
        while (status := self.health()) != want and time.monotonic() < deadline:
            time.sleep(0.1)
        return status


def _settings(triton, **kw) -> ServeSettings:
    """Settings for ``triton``: a running EmbeddedTriton (with the key its inference API needs) or a bare URL."""
    url, key = (triton, "") if isinstance(triton, str) else (triton.grpc_url, triton.client_key)
    return ServeSettings(triton_url=url, triton_key=key, max_body_bytes=BODY_LIMIT, **kw)


@pytest.fixture(scope="module")
def server(tiny_triton):
    with ServerThread(_settings(tiny_triton)) as running:
        yield running


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _pipeline_analyze(triton, data: bytes):
    async def go():
        pipe = Pipeline.from_settings(_settings(triton))
        try:
            return await pipe.analyze(data, AnalyzeOptions(heatmap=True, overlay=True)), await pipe.info()
        finally:
            await pipe.close()

    return asyncio.run(go())


def test_analyze_equals_the_pipeline(server, tiny_triton, slice_jpeg):
    reply = server.stub.Analyze(pb.AnalyzeRequest(image=slice_jpeg, overlay=True, heatmap=True, id="case-1"),
                                timeout=30)
    expected, info = _pipeline_analyze(tiny_triton, slice_jpeg)
    assert reply.id == "case-1" and not reply.HasField("error")
    assert reply.label == expected.label
    assert dict(reply.probabilities) == pytest.approx(expected.probabilities, abs=1e-6)
    assert (reply.refer, list(reply.refer_reason)) == (expected.refer, expected.refer_reason)
    assert reply.tumor_area_px == expected.tumor_area_px and not reply.HasField("tumor_area_mm2")
    assert reply.mask_label_disagree == expected.mask_label_disagree
    assert (reply.image_height, reply.image_width) == expected.original_shape
    np.testing.assert_array_equal(_png(reply.mask_png), _png(expected.mask_png))
    np.testing.assert_array_equal(_png(reply.heatmap_png), _png(expected.heatmap_png))
    assert _png(reply.overlay_png).shape == (*expected.original_shape, 3)
    assert (reply.model.name, reply.model.version) == (info.name, info.version)

    bare = server.stub.Analyze(pb.AnalyzeRequest(image=slice_jpeg, overlay=True, skip_images=True), timeout=30)
    assert bare.label == reply.label and not (bare.mask_png or bare.heatmap_png or bare.overlay_png)
    plain = server.stub.Analyze(pb.AnalyzeRequest(image=slice_jpeg), timeout=30)  # the heatmap is on demand
    assert plain.mask_png == reply.mask_png and not (plain.heatmap_png or plain.overlay_png)


def test_mask_format_rle_gives_the_png_mask(server, slice_jpeg):
    from pycocotools import mask as coco

    png = server.stub.Analyze(pb.AnalyzeRequest(image=slice_jpeg, overlay=True), timeout=30)
    rle = server.stub.Analyze(pb.AnalyzeRequest(image=slice_jpeg, overlay=True, mask_format="rle"), timeout=30)
    assert not png.HasField("mask_rle") and png.mask_png.startswith(b"\x89PNG")
    assert rle.mask_png == b"" and list(rle.mask_rle.size) == [rle.image_height, rle.image_width]
    expected = _png(png.mask_png) > 127
    assert expected.shape == (png.image_height, png.image_width) and expected.sum() == png.tumor_area_px
    decoded = coco.decode({"size": list(rle.mask_rle.size), "counts": rle.mask_rle.counts}).astype(bool)
    np.testing.assert_array_equal(decoded, expected)
    assert rle.overlay_png == png.overlay_png and rle.tumor_area_px == png.tumor_area_px

    requests = [pb.AnalyzeRequest(image=slice_jpeg, id="r", mask_format="rle"),
                pb.AnalyzeRequest(image=slice_jpeg, id="p", mask_format="png"),
                pb.AnalyzeRequest(image=slice_jpeg, id="x", mask_format="bmp")]
    by_id = {r.id: r for r in server.stub.AnalyzeStream(iter(requests), timeout=60)}
    assert by_id["r"].mask_rle == rle.mask_rle and by_id["r"].mask_png == b""
    assert by_id["p"].mask_png == png.mask_png and not by_id["p"].HasField("mask_rle")
    assert by_id["x"].error.code == "INVALID_ARGUMENT" and "use one of png, rle" in by_id["x"].error.message

    error = _code(lambda: server.stub.Analyze(pb.AnalyzeRequest(image=slice_jpeg, mask_format="jpeg"), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown mask_format 'jpeg'; use one of png, rle" in error.details()


def test_stream_answers_every_image_and_isolates_the_bad_one(server, slice_jpeg):
    ids = ["g0", "g1", "bad", "g2"]
    requests = [pb.AnalyzeRequest(image=b"definitely not an image" if i == "bad" else slice_jpeg, id=i) for i in ids]
    responses = list(server.stub.AnalyzeStream(iter(requests), timeout=60))
    by_id = {r.id: r for r in responses}
    assert len(responses) == 4 and set(by_id) == set(ids)
    assert by_id["bad"].error.code == "INVALID_ARGUMENT" and "JPEG, PNG or DICOM" in by_id["bad"].error.message
    good = [by_id[i] for i in ("g0", "g1", "g2")]
    assert all(not r.HasField("error") and r.mask_png.startswith(b"\x89PNG") for r in good)
    assert len({(r.label, tuple(sorted(r.probabilities.items())), r.tumor_area_px) for r in good}) == 1


@pytest.mark.parametrize("image, code, fragment", [
    (b"GIF89a not what we read", "INVALID_ARGUMENT", "JPEG, PNG or DICOM"),
    (b"", "INVALID_ARGUMENT", "empty image"),
    (b"\xff" * (BODY_LIMIT + 1), "INVALID_ARGUMENT", f"{BODY_LIMIT}-byte limit"),  # ours, within grpc's margin
    (b"\xff" * (BODY_LIMIT + MESSAGE_MARGIN + 1), "RESOURCE_EXHAUSTED", "larger than max"),  # grpc's own limit
])
def test_bad_requests_get_a_clear_status(server, image, code, fragment):
    error = _code(lambda: server.stub.Analyze(pb.AnalyzeRequest(image=image), timeout=30))
    assert error.code() == grpc.StatusCode[code] and fragment in error.details()


def test_tiny_deadline_is_deadline_exceeded_and_the_server_carries_on(server, slice_jpeg):
    error = _code(lambda: server.stub.Analyze(pb.AnalyzeRequest(image=slice_jpeg), timeout=0.001))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert server.stub.Analyze(pb.AnalyzeRequest(image=slice_jpeg), timeout=30).label


def test_model_info(server, tiny_triton, slice_jpeg):
    _, info = _pipeline_analyze(tiny_triton, slice_jpeg)
    reply = server.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert (reply.name, reply.version, tuple(reply.classes)) == (info.name, info.version, info.classes)
    assert (reply.image_size, reply.geometry) == (info.preprocess.image_size, info.preprocess.geometry)
    assert reply.HasField("refer_threshold") == (info.refer_threshold is not None)


@pytest.mark.skipif(not HAS_EXPLAIN, reason="serving/explain.py is not there yet")
def test_explain_gradcam(server, slice_jpeg):
    analysis = server.stub.Analyze(pb.AnalyzeRequest(image=slice_jpeg, heatmap=True), timeout=30)
    reply = server.stub.Explain(pb.ExplainRequest(image=slice_jpeg), timeout=60)  # "" = gradcam, predicted class
    assert (reply.method, reply.target, reply.label, reply.num_samples) == ("gradcam", analysis.label,
                                                                            analysis.label, 0)
    assert _png(reply.heatmap_png).shape == (reply.image_height, reply.image_width, 3)
    np.testing.assert_array_equal(_png(reply.heatmap_png), _png(analysis.heatmap_png))  # same CAM, same class
    error = _code(lambda: server.stub.Explain(pb.ExplainRequest(image=slice_jpeg, method="occlusion"), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "gradcam" in error.details()


@pytest.mark.skipif(not HAS_EXPLAIN, reason="serving/explain.py is not there yet")
@pytest.mark.parametrize("method, budget", [("lime", {"num_samples": 20}), ("shap", {"max_evals": 20})])
def test_explain_perturbation_methods(server, slice_jpeg, method, budget):
    pytest.importorskip(method)
    request = pb.ExplainRequest(image=slice_jpeg, method=method, target="glioma", **budget)
    reply = server.stub.Explain(request, timeout=120)
    assert (reply.method, reply.target) == (method, "glioma") and reply.num_samples > 0
    assert _png(reply.overlay_png).shape == (reply.image_height, reply.image_width, 3)
    assert server.stub.Explain(request, timeout=60).cached


def test_health_and_reflection(server):
    assert server.wait_health(health_pb2.HealthCheckResponse.SERVING) == health_pb2.HealthCheckResponse.SERVING
    assert server.health(SERVICE) == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    answers = list(reflect.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]), timeout=10))
    assert SERVICE in {s.name for s in answers[0].list_services_response.service}
    assert answers[1].file_descriptor_response.file_descriptor_proto  # grpcurl can describe the API


def test_metrics_endpoint(server, slice_jpeg):
    from prometheus_client.parser import text_string_to_metric_families

    server.stub.Analyze(pb.AnalyzeRequest(image=slice_jpeg), timeout=30)
    _code(lambda: server.stub.Analyze(pb.AnalyzeRequest(image=b"nope"), timeout=30))
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts = {(s.labels["frontend"], s.labels["endpoint"], s.labels["status"]): s.value
              for family in text_string_to_metric_families(text) if family.name == "braintumor_requests"
              for s in family.samples if s.name == "braintumor_requests_total"}
    assert counts[("grpc", "Analyze", "OK")] >= 1 and counts[("grpc", "Analyze", "INVALID_ARGUMENT")] >= 1
    assert 'braintumor_images_total{frontend="grpc"}' in text
    assert 'braintumor_errors_total{frontend="grpc",kind="bad_input"}' in text


def test_api_key(tiny_triton, slice_jpeg):
    with ServerThread(_settings(tiny_triton, api_key="s3cret")) as server:
        error = _code(lambda: server.stub.Analyze(pb.AnalyzeRequest(image=slice_jpeg), timeout=30))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "x-api-key" in error.details()
        wrong = _code(lambda: server.stub.GetModelInfo(pb.ModelInfoRequest(), metadata=[("x-api-key", "guess")],
                                                       timeout=30))
        assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
        assert server.stub.Analyze(pb.AnalyzeRequest(image=slice_jpeg), metadata=[("x-api-key", "s3cret")],
                                   timeout=30).label
        assert server.stub.GetModelInfo(pb.ModelInfoRequest(), metadata=[("authorization", "Bearer s3cret")],
                                        timeout=30).classes
        assert server.wait_health(health_pb2.HealthCheckResponse.SERVING) == health_pb2.HealthCheckResponse.SERVING


def test_unreachable_triton_is_unavailable_and_not_serving(slice_jpeg):
    with ServerThread(_settings(f"127.0.0.1:{free_port()}", triton_timeout_s=2.0)) as server:
        error = _code(lambda: server.stub.Analyze(pb.AnalyzeRequest(image=slice_jpeg), timeout=30))
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "Triton" in error.details()
        assert dict(error.trailing_metadata())["retry-after"] == "1"  # as the gateway's 503 (issue 13)
        assert server.health() == server.health(SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING

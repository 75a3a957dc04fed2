"""The SDK over gRPC against a real in-process grpc server with a scripted ``BrainTumorServicer``: status codes map to
the SDK's exceptions with the server's message, only UNAVAILABLE is retried, the API key travels as metadata,
AnalyzeStream answers (out of order, per-image errors) come back in input order, health, explain jobs, close."""

import asyncio
import queue
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from braintumor.clients import (AsyncBrainTumorClient, AuthenticationError, BrainTumorClient, DeadlineExceededError,
                                InvalidInputError, NotFoundError, OverloadedError, ServerError, UnavailableError)
from braintumor.clients.masks import encode_rle, mask_png
from braintumor.clients.v1 import braintumor_pb2 as pb
from braintumor.clients.v1 import braintumor_pb2_grpc as pb_grpc

ABORTS = {  # image bytes -> the status Analyze answers with
    b"bad": (grpc.StatusCode.INVALID_ARGUMENT, "the file is not a JPEG, PNG or DICOM image"),
    b"busy": (grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy"),
    b"down": (grpc.StatusCode.UNAVAILABLE, "Triton is down"),
    b"bug": (grpc.StatusCode.INTERNAL, "internal error; the server logged it"),
    b"late": (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed"),
    b"gone": (grpc.StatusCode.NOT_FOUND, "no such thing"),
    b"who": (grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key"),
}


RLE_MASK = np.zeros((3, 5), bool)
RLE_MASK[1, 1:4] = True


def _answer(request: pb.AnalyzeRequest) -> pb.AnalyzeResponse:
    label = request.image.decode(errors="replace").split(":")[-1]
    rle = request.mask_format == "rle"
    return pb.AnalyzeResponse(id=request.id, label=label, probabilities={label: 1.0}, tumor_area_px=len(request.image),
                              mask_png=b"" if rle else b"mask", heatmap_png=b"heat" if request.heatmap else b"",
                              overlay_png=b"over" if request.overlay else b"",
                              mask_rle=pb.MaskRle(**encode_rle(RLE_MASK)) if rle else None,
                              model=pb.ModelRef(name="brain_tumor", version="2"))


class Servicer(pb_grpc.BrainTumorServicer):
    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.metadata: list[dict] = []
        self.flaky = 0  # the next `flaky` calls answer UNAVAILABLE
        self.flaky_items = 0  # the next `flaky_items` stream images named b"flaky" answer with an UNAVAILABLE error
        self.lock = threading.Lock()
        self.mask_formats: list[str] = []  # AnalyzeRequest.mask_format of each call and stream item

    def _record(self, rpc: str, image: bytes, context) -> None:
        with self.lock:
            self.calls.append((rpc, image))
            self.metadata.append(dict(context.invocation_metadata()))
            flaky, self.flaky = self.flaky, max(self.flaky - 1, 0)
        if flaky:
            context.abort(grpc.StatusCode.UNAVAILABLE, "Triton is restarting")
        if self.metadata[-1].get("x-api-key") == "wrong":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")

    def Analyze(self, request, context):
        self._record("Analyze", request.image, context)
        self.mask_formats.append(request.mask_format)
        if request.image in ABORTS:
            context.abort(*ABORTS[request.image])
        if request.image == b"slow":
            time.sleep(1.0)
        return _answer(request)

    def AnalyzeStream(self, request_iterator, context):
        """Each image answered by its own thread, `late:` ones 0.2 s later, so answers come back out of order;
        `bad` and `down` images answer with `error` set, as the real server does."""
        self._record("AnalyzeStream", b"", context)
        answers: queue.Queue = queue.Queue()

        def work(request) -> None:
            with self.lock:
                self.calls.append(("item", request.image))
                self.mask_formats.append(request.mask_format)
                down = request.image == b"down" or (request.image == b"flaky" and self.flaky_items > 0)
                if request.image == b"flaky":
                    self.flaky_items = max(self.flaky_items - 1, 0)
            if request.image.startswith(b"late:"):
                time.sleep(0.2)
            if request.image == b"bad":
                answers.put(pb.AnalyzeResponse(id=request.id, error=pb.Error(code="INVALID_ARGUMENT",
                                                                             message="not an image")))
            elif down:
                answers.put(pb.AnalyzeResponse(id=request.id, error=pb.Error(code="UNAVAILABLE",
                                                                             message="Triton is down")))
            else:
                answers.put(_answer(request))

        def read() -> None:
            workers = []
            try:
                for request in request_iterator:
                    workers.append(threading.Thread(target=work, args=(request,), daemon=True))
                    workers[-1].start()
                for worker in workers:
                    worker.join()
            except grpc.RpcError:  # the client cancelled the stream
                pass
            finally:
                answers.put(None)

        threading.Thread(target=read, daemon=True).start()
        while (answer := answers.get()) is not None:
            yield answer

    def Explain(self, request, context):
        self._record("Explain", request.image, context)
        if request.method not in ("gradcam", "lime", "shap"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "method must be one of gradcam, lime, shap")
        if request.image == b"slow":
            time.sleep(0.5)
        return pb.ExplainResponse(method=request.method, target=request.target or "glioma", label="glioma",
                                  num_samples=request.num_samples, heatmap_png=b"heat")

    def GetModelInfo(self, request, context):
        self._record("GetModelInfo", b"", context)
        return pb.ModelInfo(name="brain_tumor", version="2", classes=["glioma", "no_tumor"], image_size=32,
                            geometry="crop_pad")


@pytest.fixture(scope="module")
def server():
    servicer = Servicer()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_BrainTumorServicer_to_server(servicer, grpc_server)
    health = None
    try:
        from grpc_health.v1 import health as health_module
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_module.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
        health.set("", health_pb2.HealthCheckResponse.SERVING)
    except ImportError:  # grpcio-health-checking is a server dependency; the health test skips without it
        pass
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    servicer.target, servicer.health = f"127.0.0.1:{port}", health
    yield servicer
    grpc_server.stop(0)


@pytest.fixture
def servicer(server):
    server.calls.clear()
    server.metadata.clear()
    server.mask_formats.clear()
    server.flaky = server.flaky_items = 0
    return server


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(AsyncBrainTumorClient, "_backoff", staticmethod(lambda attempt: 0.01))


def test_analyze_with_api_key(servicer):
    with BrainTumorClient(servicer.target, api_key="s3cret") as client:
        analysis = client.analyze(b"img:glioma", overlay=True)
    assert (analysis.label, analysis.mask_png, analysis.overlay_png, analysis.model_version) == (
        "glioma", b"mask", b"over", "2")
    assert analysis.heatmap_png == b""  # explanations on demand: not asked by default
    assert servicer.calls == [("Analyze", b"img:glioma")]
    assert servicer.metadata[0]["x-api-key"] == "s3cret"


@pytest.mark.parametrize("image, cls", [(b"bad", InvalidInputError), (b"busy", OverloadedError),
                                        (b"bug", ServerError), (b"late", DeadlineExceededError),
                                        (b"gone", NotFoundError), (b"who", AuthenticationError)])
def test_status_codes_map_and_are_not_retried(servicer, image, cls, fast_backoff):
    code, message = ABORTS[image]
    with BrainTumorClient(servicer.target, retries=3) as client, pytest.raises(cls) as info:
        client.analyze(image)
    assert (info.value.code, info.value.detail, info.value.status) == (code.name, message, None)
    assert len(servicer.calls) == 1


def test_unavailable_is_retried(servicer, fast_backoff):
    servicer.flaky = 2
    with BrainTumorClient(servicer.target, retries=2) as client:
        assert client.analyze(b"img:pituitary").label == "pituitary"
    assert len(servicer.calls) == 3
    servicer.calls.clear()
    with BrainTumorClient(servicer.target, retries=1) as client:
        with pytest.raises(UnavailableError, match="Triton is down"):
            client.analyze(b"down")
    assert len(servicer.calls) == 2


def test_connection_refused_is_unavailable_after_retries(fast_backoff):
    from braintumor.serving.triton_embedded import free_port

    with BrainTumorClient(f"127.0.0.1:{free_port()}", retries=1, timeout=5) as client:
        with pytest.raises(UnavailableError):
            client.analyze(b"img")
        health = client.health()
    assert (health.live, health.ready) == (False, False)


def test_client_timeout_is_a_deadline(servicer):
    with BrainTumorClient(servicer.target, timeout=0.3) as client, pytest.raises(DeadlineExceededError):
        client.analyze(b"slow")


def test_heatmap_on_demand(servicer):
    with BrainTumorClient(servicer.target) as client:
        one = client.analyze(b"img:glioma", heatmap=True)
        many = list(client.analyze_many([b"a:glioma", b"b:pituitary"], heatmap=True))
        plain = list(client.analyze_many([b"c:glioma"]))
    assert one.heatmap_png == b"heat" and [a.heatmap_png for a in many] == [b"heat", b"heat"]
    assert plain[0].heatmap_png == b""


def test_mask_format_rle_over_grpc(servicer, tmp_path):
    with BrainTumorClient(servicer.target) as client:
        one = client.analyze(b"img:glioma", mask_format="rle")
        many = list(client.analyze_many([b"a:glioma", b"b:pituitary"], mask_format="rle"))
        default = client.analyze(b"img:glioma")
        with pytest.raises(ValueError, match="use one of png, rle"):
            client.analyze(b"img:glioma", mask_format="jpeg")  # refused before anything is sent
    assert servicer.mask_formats == ["rle", "rle", "rle", ""]  # the default leaves the field as it was before it
    for analysis in (one, *many):
        assert analysis.mask_png == b"" and analysis.mask_rle == encode_rle(RLE_MASK)
        np.testing.assert_array_equal(analysis.mask_array(), RLE_MASK)
    assert default.mask_png == b"mask" and default.mask_rle is None
    assert one.save_mask(tmp_path / "m.png").read_bytes() == mask_png(RLE_MASK)


def test_analyze_many_over_one_stream_in_input_order(servicer, tmp_path):
    images = [b"late:glioma", b"b:meningioma", b"bad", b"late:pituitary", tmp_path / "missing.png",
              np.zeros((9, 9), np.float64), b"d:no_tumor"]
    with BrainTumorClient(servicer.target) as client:
        answers = list(client.analyze_many(images, overlay=True, concurrency=3))
    labels = [getattr(a, "label", type(a).__name__) for a in answers]
    assert labels == ["glioma", "meningioma", "InvalidInputError", "pituitary", "InvalidInputError",
                      "InvalidInputError", "no_tumor"]
    assert answers[2].code == "INVALID_ARGUMENT" and answers[2].detail == "not an image"
    assert answers[4].code == "local_input" and "missing.png" in answers[4].detail
    assert "2-D" in answers[5].detail and answers[0].overlay_png == b"over"
    assert [rpc for rpc, _ in servicer.calls].count("AnalyzeStream") == 1  # one stream for all images
    assert len([c for c in servicer.calls if c[0] == "item"]) == 5


def test_stream_retries_an_unavailable_image(servicer, fast_backoff):
    servicer.flaky_items = 1
    with BrainTumorClient(servicer.target, retries=2) as client:
        answers = list(client.analyze_many([b"x:glioma", b"flaky", b"y:glioma"], concurrency=4))
        assert answers[1].label == "flaky"
        assert [c[1] for c in servicer.calls if c[0] == "item"].count(b"flaky") == 2
        down = list(client.analyze_many([b"down", b"z:glioma"]))
    assert isinstance(down[0], UnavailableError) and down[1].label == "glioma"


def test_stream_refused_by_the_server_fails_every_image(servicer):
    with BrainTumorClient(servicer.target, retries=0) as client:
        servicer.flaky = 1  # the stream itself is aborted UNAVAILABLE
        answers = list(client.analyze_many([b"a:glioma", b"b:glioma", b"c:glioma"], concurrency=2))
    assert all(isinstance(a, UnavailableError) for a in answers)


def test_stream_refused_for_a_wrong_key_is_an_authentication_error_for_every_image(servicer):
    """Also when grpc.aio loses the server's status because a request was still being written (grpc/grpc#36066)."""
    with BrainTumorClient(servicer.target, api_key="wrong") as client:
        for _ in range(5):
            answers = list(client.analyze_many([b"a:glioma"] * 6, concurrency=3))
            assert all(isinstance(a, AuthenticationError) for a in answers), answers


def test_stream_reopens_after_unavailable(servicer, fast_backoff):
    with BrainTumorClient(servicer.target, retries=2) as client:
        servicer.flaky = 1
        answers = list(client.analyze_many([b"a:glioma", b"b:meningioma"]))
    assert [a.label for a in answers] == ["glioma", "meningioma"]
    assert [rpc for rpc, _ in servicer.calls].count("AnalyzeStream") == 2


def test_explain_model_health(servicer):
    with BrainTumorClient(servicer.target) as client:
        explanation = client.explain(b"img", method="lime", target="glioma", num_samples=20)
        assert (explanation.method, explanation.target, explanation.num_samples) == ("lime", "glioma", 20)
        with pytest.raises(InvalidInputError, match="gradcam, lime, shap"):
            client.explain(b"img", method="saliency")
        assert client.model() == {"name": "brain_tumor", "version": "2", "classes": ["glioma", "no_tumor"],
                                  "refer_threshold": None, "disagree_min_area": None, "ood_threshold": None,
                                  "image_size": 32,
                                  "geometry": "crop_pad"}
        if servicer.health is None:
            pytest.skip("grpcio-health-checking is not installed")
        health = client.health()
        assert health.live and health.ready and health.model["version"] == "2"
        from grpc_health.v1 import health_pb2

        servicer.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            health = client.health()
        finally:
            servicer.health.set("", health_pb2.HealthCheckResponse.SERVING)
        assert (health.live, health.ready, health.model) == (True, False, None)


def test_submit_explain_runs_in_the_background(servicer):
    with BrainTumorClient(servicer.target) as client:
        job = client.submit_explain(b"slow", method="gradcam")
        assert job.id.startswith("local-") and job.status() == "in_progress"
        with pytest.raises(DeadlineExceededError):
            job.result(timeout=0.05)
        assert job.result(timeout=10).method == "gradcam" and job.status() == "completed"
        failing = client.submit_explain(b"img", method="saliency")
        with pytest.raises(InvalidInputError):
            failing.result(timeout=10)
        assert failing.status() == "failed"


def test_close_closes_the_channel(servicer):
    client = BrainTumorClient(servicer.target)
    client.analyze(b"img:glioma")
    channel = client._async._transport._channel
    thread = client._loop.thread
    with client:
        pass
    assert client._async._transport._channel is None and not thread.is_alive()
    assert channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN


def test_async_client(servicer):
    async def main():
        async with AsyncBrainTumorClient(f"grpc://{servicer.target}") as client:
            one = await client.analyze(b"img:glioma", heatmap=True)

            async def images():
                for image in (b"a:pituitary", b"bad"):
                    yield image

            many = [answer async for answer in client.analyze_many(images())]
            return one, many

    one, many = asyncio.run(main())
    assert one.label == "glioma" and many[0].label == "pituitary" and isinstance(many[1], InvalidInputError)
    assert one.heatmap_png == b"heat" and many[0].heatmap_png == b""


@pytest.mark.parametrize("url, target", [("h:1", "h:1"), ("h", "h:50051"), ("http://h:2/", "h:2"),
                                         ("grpc://h:3", "h:3"), ("[::1]:4", "[::1]:4")])
def test_url_forms(url, target):
    with BrainTumorClient(url) as client:
        assert client.url == target

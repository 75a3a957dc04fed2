"""The SDK over HTTP against a scripted gateway (httpx.MockTransport): request shape, API key, error mapping, retries
only on 503/502/connection refused, ordered analyze_many with per-item errors, explain tasks, health."""

import asyncio
import base64
import json
import threading

import httpx
import numpy as np
import pytest

from braintumor.clients import (AsyncBrainTumorClient, AuthenticationError, BrainTumorClient, DeadlineExceededError,
                                InvalidInputError, NotFoundError, OverloadedError, ServerError, UnavailableError)
from braintumor.clients.aio import AsyncExplainJob
from braintumor.clients.client import ExplainJob
from braintumor.clients.masks import encode_rle, mask_png

PNG = b"\x89PNG\r\n\x1a\n fake"


def _analysis(label: str = "glioma", heatmap: bool = False) -> dict:
    return {"label": label, "probabilities": {"glioma": 0.7, "no_tumor": 0.3}, "refer": False, "refer_reason": [],
            "tumor_area_px": 12, "tumor_area_mm2": None, "mask_label_disagree": False, "image_height": 8,
            "image_width": 8, "mask_png": base64.b64encode(PNG).decode(),
            "heatmap_png": base64.b64encode(PNG).decode() if heatmap else None,  # the gateway's null when not asked
            "overlay_png": None, "model": {"name": "brain_tumor", "version": "1"}}


def _explanation(method: str, target: str = "glioma") -> dict:
    return {"method": method, "target": target, "label": "glioma", "probabilities": {"glioma": 1.0},
            "num_samples": 0, "seconds": 0.1, "cached": False, "image_height": 8, "image_width": 8,
            "heatmap_png": base64.b64encode(PNG).decode(), "overlay_png": base64.b64encode(PNG).decode(),
            "model": {"name": "brain_tumor", "version": "1"}}


def _error(status: int, kind: str, detail: str) -> httpx.Response:
    return httpx.Response(status, json={"error": kind, "detail": detail})


class Gateway:
    """Answers by route; ``script`` is a list of responses (or exceptions) served before the normal answer."""

    def __init__(self, *script) -> None:
        self.script = list(script)
        self.requests: list[httpx.Request] = []
        self.lock = threading.Lock()
        self.tasks: dict[str, list[str]] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.requests.append(request)
            step = self.script.pop(0) if self.script else None
        if isinstance(step, Exception):
            raise step
        if step is not None:
            return step
        path = request.url.path
        if path == "/analyze":
            body = request.content
            if b"bad image" in body:
                return _error(400, "bad_input", "the file is not a JPEG, PNG or DICOM image")
            label = "meningioma" if b"second" in body else "glioma"
            return httpx.Response(200, json=_analysis(label, heatmap=b'name="heatmap"\r\n\r\ntrue' in body))
        if path == "/explain":
            return httpx.Response(200, json=_explanation("gradcam"))
        if path == "/explain/submit":
            task_id = f"task-{len(self.tasks)}"
            failing = b"saliency" in request.content
            self.tasks[task_id] = ["in_progress", "in_progress", "failed" if failing else "completed"]
            return httpx.Response(200, json={"task_id": task_id, "status": "in_progress"})
        if path == "/explain/status":
            states = self.tasks.get(request.url.params["task_id"])
            if states is None:
                return httpx.Response(404, json={"error": "not_found", "detail": "task_id not found"})
            return httpx.Response(200, json={"status": states.pop(0) if len(states) > 1 else states[0]})
        if path == "/explain/get":
            if self.tasks[request.url.params["task_id"]][-1] == "failed":
                return _error(400, "bad_input", "method must be one of gradcam, lime, shap")
            return httpx.Response(200, json=_explanation("lime"))
        if path in ("/healthz", "/readyz"):
            return httpx.Response(200, text="ok")
        if path == "/model":
            return httpx.Response(200, json={"name": "brain_tumor", "version": "1", "classes": ["glioma"]})
        return httpx.Response(404, text="no route")


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(AsyncBrainTumorClient, "_backoff", staticmethod(lambda attempt: 0.01))
    monkeypatch.setattr("braintumor.clients.aio.POLL_INITIAL_S", 0.01)


def _client(gateway: Gateway, **kw) -> BrainTumorClient:
    return BrainTumorClient("gateway:3000", protocol="http", http_transport=httpx.MockTransport(gateway), **kw)


def test_analyze_sends_multipart_with_the_api_key(fast_backoff):
    gateway = Gateway()
    with _client(gateway, api_key="s3cret") as client:
        assert client.url == "http://gateway:3000"
        analysis = client.analyze(b"jpeg bytes", overlay=True)
    assert analysis.label == "glioma" and analysis.mask_png == PNG and analysis.model_version == "1"
    request = gateway.requests[0]
    assert request.method == "POST" and str(request.url) == "http://gateway:3000/analyze"
    assert request.headers["x-api-key"] == "s3cret"
    assert request.headers["content-type"].startswith("multipart/form-data")
    assert b'name="image"' in request.content and b"jpeg bytes" in request.content
    assert b'name="overlay"\r\n\r\ntrue' in request.content
    assert b'name="heatmap"\r\n\r\nfalse' in request.content  # explanations on demand: not asked by default
    assert analysis.heatmap_png == b""
    with pytest.raises(ValueError, match="heatmap=True"):
        analysis.save_heatmap("unused.png")


def test_heatmap_on_demand(fast_backoff):
    gateway = Gateway()
    with _client(gateway) as client:
        one = client.analyze(b"jpeg bytes", heatmap=True)
        many = list(client.analyze_many([b"a", b"second"], heatmap=True))
    assert one.heatmap_png == PNG and [a.heatmap_png for a in many] == [PNG, PNG]
    assert all(b'name="heatmap"\r\n\r\ntrue' in r.content for r in gateway.requests)


@pytest.mark.parametrize("response, cls", [
    (_error(400, "bad_input", "truncated JPEG"), InvalidInputError),
    (_error(413, "payload_too_large", "over the limit"), InvalidInputError),
    (_error(415, "unsupported_media_type", "send multipart"), InvalidInputError),
    (_error(401, "unauthenticated", "missing or wrong API key"), AuthenticationError),
    (_error(404, "not_found", "no such task"), NotFoundError),
    (_error(429, "busy", "too many requests"), OverloadedError),
    (_error(500, "internal", "logged on the server"), ServerError),
    (_error(504, "deadline_exceeded", "Triton was too slow"), DeadlineExceededError),
])
def test_errors_are_mapped_and_never_retried(response, cls, fast_backoff):
    gateway = Gateway(response)
    with _client(gateway, retries=3) as client, pytest.raises(cls) as info:
        client.analyze(b"jpeg bytes")
    assert info.value.detail == json.loads(response.content)["detail"]
    assert info.value.code == json.loads(response.content)["error"]
    assert info.value.status == response.status_code
    assert len(gateway.requests) == 1


def test_non_json_error_body_keeps_its_text(fast_backoff):
    gateway = Gateway(httpx.Response(500, text="Internal Server Error"))
    with _client(gateway) as client, pytest.raises(ServerError, match="Internal Server Error") as info:
        client.model()
    assert info.value.code == "Internal Server Error"


@pytest.mark.parametrize("failure", [
    _error(503, "unavailable", "Triton is down"),
    httpx.Response(502, text="bad gateway"),
    httpx.ConnectError("connection refused"),
])
def test_unavailable_is_retried_then_succeeds(failure, fast_backoff):
    gateway = Gateway(failure, failure)
    with _client(gateway, retries=2) as client:
        assert client.analyze(b"jpeg bytes").label == "glioma"
    assert len(gateway.requests) == 3


def test_retries_are_bounded(fast_backoff):
    gateway = Gateway(*[_error(503, "unavailable", "Triton is down")] * 10)
    with _client(gateway, retries=2) as client, pytest.raises(UnavailableError, match="Triton is down"):
        client.analyze(b"jpeg bytes")
    assert len(gateway.requests) == 3
    gateway = Gateway(*[_error(503, "unavailable", "Triton is down")] * 10)
    with _client(gateway, retries=0) as client, pytest.raises(UnavailableError):
        client.analyze(b"jpeg bytes")
    assert len(gateway.requests) == 1


def test_client_timeout_is_deadline_exceeded(fast_backoff):
    gateway = Gateway(httpx.ReadTimeout("slow"))
    with _client(gateway) as client, pytest.raises(DeadlineExceededError) as info:
        client.analyze(b"jpeg bytes")
    assert info.value.code == "client_timeout" and len(gateway.requests) == 1


def test_analyze_many_keeps_order_and_yields_errors(tmp_path, fast_backoff):
    gateway = Gateway()
    images = [b"first", b"bad image", tmp_path / "missing.jpg", b"second", b"first"]
    with _client(gateway) as client:
        answers = list(client.analyze_many(images, concurrency=2))
    assert [getattr(a, "label", None) for a in answers] == ["glioma", None, None, "meningioma", "glioma"]
    assert isinstance(answers[1], InvalidInputError) and answers[1].status == 400
    assert isinstance(answers[2], InvalidInputError) and answers[2].code == "local_input"
    assert "missing.jpg" in answers[2].detail
    assert len(gateway.requests) == 4  # the missing file was never sent


def test_analyze_many_stops_early_without_leaks(fast_backoff):
    gateway = Gateway()
    with _client(gateway) as client:
        for answer in client.analyze_many(iter([b"first"] * 50), concurrency=4):
            break
        assert answer.label == "glioma"
        assert client.analyze(b"second").label == "meningioma"  # the client still works
    assert len(gateway.requests) < 10  # the input is read lazily, a window at a time


def test_gradcam_is_one_request_lime_is_submit_and_poll(fast_backoff):
    gateway = Gateway()
    with _client(gateway) as client:
        assert client.explain(b"jpeg", method="gradcam").method == "gradcam"
        assert [r.url.path for r in gateway.requests] == ["/explain"]
        lime = client.explain(b"jpeg", method="lime", target="glioma", num_samples=20)
    assert lime.method == "lime" and lime.heatmap_png == PNG
    paths = [r.url.path for r in gateway.requests[1:]]
    assert paths[0] == "/explain/submit" and paths[-1] == "/explain/get" and "/explain/status" in paths
    submit = gateway.requests[1].content
    assert b'name="num_samples"\r\n\r\n20' in submit and b'name="target"\r\n\r\nglioma' in submit
    assert b"max_evals" not in submit  # options left out are not sent


def test_explain_job_status_and_failure(fast_backoff):
    gateway = Gateway()
    with _client(gateway) as client:
        job = client.submit_explain(b"jpeg", method="saliency")
        assert job.id == "task-0" and job.status() == "in_progress"
        with pytest.raises(InvalidInputError, match="gradcam, lime, shap"):
            job.result(timeout=5)
        gateway.tasks["task-1"] = ["in_progress"]  # never finishes
        stuck = ExplainJob(client, AsyncExplainJob(client._async, "task-1"))
        with pytest.raises(DeadlineExceededError, match="still in_progress"):
            stuck.result(timeout=0.1)
        with pytest.raises(NotFoundError):
            ExplainJob(client, AsyncExplainJob(client._async, "no-such-task")).status()


def test_a_fetched_job_answers_from_what_it_fetched(fast_backoff):
    """The gateway deletes a task once its result is fetched; the job keeps answering without asking again."""
    gateway = Gateway()
    with _client(gateway) as client:
        job = client.submit_explain(b"jpeg", method="lime", target="glioma", num_samples=20)
        first = job.result(timeout=5)
        gateway.tasks.pop(job.id, None)
        sent = len(gateway.requests)
        assert job.status() == "completed" and job.result(timeout=5) is first
        assert len(gateway.requests) == sent


def test_health_and_model(fast_backoff):
    with _client(Gateway()) as client:
        health = client.health()
        assert health.live and health.ready and health.model["name"] == "brain_tumor"
    with _client(Gateway(httpx.Response(200), _error(503, "unavailable", "not ready"))) as client:
        health = client.health()
        assert (health.live, health.ready, health.model) == (True, False, None)
    with _client(Gateway(httpx.ConnectError("refused"))) as client:
        health = client.health()
        assert (health.live, health.ready) == (False, False)


@pytest.mark.parametrize("url, expected", [("localhost:3000", "http://localhost:3000"),
                                           ("http://h:1/", "http://h:1"), ("https://h", "https://h"),
                                           ("grpc://h:9", "http://h:9")])
def test_url_forms(url, expected):
    with BrainTumorClient(url, protocol="http") as client:
        assert client.url == expected


def test_bad_arguments():
    with pytest.raises(ValueError, match="grpc, http"):
        BrainTumorClient(protocol="rest")
    with pytest.raises(ValueError, match="timeout"):
        BrainTumorClient(timeout=0)
    client = BrainTumorClient(protocol="http")
    client.close()
    client.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        client.analyze(b"x")


def test_mask_format_rle_over_http(fast_backoff, tmp_path):
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:7] = True
    rle_body = {**_analysis(), "mask_png": None, "mask_rle": encode_rle(mask)}
    gateway = Gateway(httpx.Response(200, json=rle_body), httpx.Response(200, json=rle_body))
    with _client(gateway) as client:
        one = client.analyze(b"jpeg bytes", mask_format="rle")
        many = list(client.analyze_many([b"a"], mask_format="rle"))
        default = client.analyze(b"jpeg bytes")
        with pytest.raises(ValueError, match="use one of png, rle"):
            client.analyze(b"jpeg bytes", mask_format="PNG")  # refused before anything is sent
    assert len(gateway.requests) == 3
    assert all(b'name="mask_format"\r\n\r\nrle' in r.content for r in gateway.requests[:2])
    # The default is not sent: a gateway older than mask_format (which refuses unknown fields) still answers.
    assert b"mask_format" not in gateway.requests[2].content
    for analysis in (one, many[0]):
        assert analysis.mask_png == b"" and analysis.mask_rle == encode_rle(mask)
        np.testing.assert_array_equal(analysis.mask_array(), mask)
        assert analysis.save_mask(tmp_path / "m.png").read_bytes() == mask_png(mask)
    assert default.mask_png == PNG and default.mask_rle is None


def test_async_client(fast_backoff):
    gateway = Gateway()

    async def main():
        async with AsyncBrainTumorClient("gateway:3000", protocol="http",
                                         http_transport=httpx.MockTransport(gateway)) as client:
            one = await client.analyze(b"first", heatmap=True)
            many = [a async for a in client.analyze_many([b"second", b"bad image"])]
            return one, many

    one, many = asyncio.run(main())
    assert one.label == "glioma" and many[0].label == "meningioma" and isinstance(many[1], InvalidInputError)
    assert one.heatmap_png == PNG and many[0].heatmap_png == b""


def test_the_sdks_multipart_body_parses_as_the_gateway_parses_it():
    """The SDK builds its multipart bodies itself (httpx's encoder cost ~1.4 ms per request): fields and the file's
    bytes, CRLFs and dashes included, come back intact through the gateway's parser; each body has its own boundary."""
    from braintumor.clients.multipart import encode
    from braintumor.serving.multipart import boundary_of, read_parts

    data = b"\xff\xd8\r\n--braintumor\r\n\x00" * 50
    body, content_type = encode({"overlay": "true", "target": "meningioma"}, "image", data)
    parts = {part.name: bytes(part.data) for part in read_parts(boundary_of(content_type), body)}
    assert parts == {"overlay": b"true", "target": b"meningioma", "image": data}
    assert encode({}, "image", data)[1] != content_type

"""`braintumor serve` as a user runs it: one subprocess brings up Triton, the HTTP gateway and the gRPC API; the same
image over HTTP and gRPC gives ONNX Runtime's answer; metrics move; SIGTERM leaves nothing behind. And the fault
drill: Triton killed while requests flow -> fast 503 / UNAVAILABLE, readiness false within 1 s, recovery by itself."""

import base64
import time

import pytest

httpx = pytest.importorskip("httpx")
grpc = pytest.importorskip("grpc")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("bentoml")

from braintumor.export import contract  # noqa: E402
from braintumor.serving.postprocess import postprocess  # noqa: E402
from braintumor.train.refer import ReferRules  # noqa: E402
from braintumor.serving.triton_embedded import EmbeddedTriton, free_port  # noqa: E402
from braintumor.train.decode import decode_image  # noqa: E402
from braintumor.train.preprocess import PreprocessConfig, preprocess  # noqa: E402

pytestmark = pytest.mark.e2e


def _grpc_analyze(port: int, data: bytes):
    from braintumor.clients.v1 import braintumor_pb2, braintumor_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return braintumor_pb2_grpc.BrainTumorStub(channel).Analyze(braintumor_pb2.AnalyzeRequest(image=data),
                                                                   timeout=60)


@pytest.mark.parametrize("backend", ["triton", "onnxruntime"])
def test_serve_http_and_grpc_agree_with_onnxruntime(backend, tiny_repository, slice_jpeg, serve_factory, proc_tree):
    """Both backends: the embedded Triton (the default) and `--backend onnxruntime` (the model in each front door,
    no Triton process at all) give ONNX Runtime's answer."""
    served = serve_factory("--model-repository", str(tiny_repository), "--backend", backend,
                           "--triton-http-port", str(free_port()), "--triton-grpc-port", str(free_port()),
                           "--triton-metrics-port", str(free_port()))
    ports, lines = served.ports, served.lines
    gateway = f"http://127.0.0.1:{ports['http']}"
    children = proc_tree.descendants(served.proc.pid)
    triton_parts = ("tritonserver", "triton_python_backend_stub")
    for part in (triton_parts if backend == "triton" else ()) + ("bentoml serve", "grpc-server"):
        assert any(part in cmd for cmd in children.values()), f"no {part} under `braintumor serve`: {children}"
    if backend == "onnxruntime":
        assert not any(part in cmd for cmd in children.values() for part in triton_parts), children
        assert any("in-process ONNX Runtime" in line for line in lines), "".join(lines[-20:])
    try:
        http = httpx.post(f"{gateway}/analyze", files={"image": ("slice.jpg", slice_jpeg, "image/jpeg")}, timeout=60)
        assert http.status_code == 200, http.text
        body = http.json()
        reply = _grpc_analyze(ports["grpc"], slice_jpeg)

        # The reference: ONNX Runtime directly on the same preprocessed input, through the same postprocessing.
        import json

        meta = json.loads((tiny_repository / contract.DEFAULT_NAME / "1" / contract.METADATA_FILE).read_text())
        decoded = decode_image(slice_jpeg)
        image, geometry = preprocess(decoded.pixels, PreprocessConfig.from_dict(meta["preprocess"]))
        session = ort.InferenceSession(str(tiny_repository / contract.DEFAULT_NAME / "1" / contract.ONNX_FILE),
                                       providers=["CPUExecutionProvider"])
        # the tiny model has no fitted OOD score: served with the three base outputs, no learned check
        outputs = dict(zip(contract.BASE_OUTPUTS, session.run(list(contract.BASE_OUTPUTS),
                                                              {contract.INPUT_NAME: image[None, None]})))
        expected = postprocess(outputs, geometry, decoded, classes=meta["classes"],
                               rules=ReferRules(meta.get("refer_threshold"), meta.get("disagree_min_area")))

        assert body["label"] == reply.label == expected.label
        for name, p in expected.probabilities.items():
            assert body["probabilities"][name] == pytest.approx(p, abs=1e-5)
            assert reply.probabilities[name] == pytest.approx(p, abs=1e-5)
        assert body["tumor_area_px"] == reply.tumor_area_px == expected.tumor_area_px
        assert base64.b64decode(body["mask_png"]) == reply.mask_png == expected.mask_png

        # LIME's perturbations go through the classifier twin (Triton's, or the in-process batcher's)
        lime = httpx.post(f"{gateway}/explain", files={"image": ("slice.jpg", slice_jpeg, "image/jpeg")},
                          data={"method": "lime", "num_samples": "20"}, timeout=120)
        assert lime.status_code == 200, lime.text
        assert lime.json()["method"] == "lime" and lime.json()["label"] == expected.label

        metrics = httpx.get(f"{gateway}/metrics", timeout=10).text
        assert 'braintumor_requests_total' in metrics and 'frontend="http"' in metrics
        grpc_metrics = httpx.get(f"http://127.0.0.1:{ports['grpc_metrics']}/metrics", timeout=10).text
        assert 'frontend="grpc"' in grpc_metrics
    finally:
        code = served.stop()
    assert code == 0, "".join(lines[-40:])
    # SIGKILL of the group in stop() does not reach the children: each runs in its own process group
    assert not proc_tree.alive(children), "processes outlived `braintumor serve`"


def test_triton_killed_then_back(tiny_repository, slice_jpeg, serve_factory):
    """External Triton (--triton-url): kill it under load, then bring it back on the same ports."""
    triton_ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    triton = EmbeddedTriton(tiny_repository, address="127.0.0.1", startup_timeout=120, **triton_ports).start()
    served = serve_factory("--triton-url", triton.grpc_url)
    ports = served.ports
    gateway = f"http://127.0.0.1:{ports['http']}"
    files = {"image": ("slice.jpg", slice_jpeg, "image/jpeg")}
    try:
        assert httpx.post(f"{gateway}/analyze", files=files, timeout=60).status_code == 200
        triton.stop(timeout=10)
        killed = time.monotonic()
        # readiness turns false within 1 s
        while httpx.get(f"{gateway}/readyz", timeout=5).status_code == 200:
            assert time.monotonic() - killed < 1.0, "gateway still ready 1 s after Triton died"
            time.sleep(0.05)
        t0 = time.monotonic()
        response = httpx.post(f"{gateway}/analyze", files=files, timeout=60)
        assert response.status_code == 503 and "Triton" in response.text
        assert time.monotonic() - t0 < 5.0, "requests must fail fast while Triton is down"
        with pytest.raises(grpc.RpcError) as info:
            _grpc_analyze(ports["grpc"], slice_jpeg)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        triton = EmbeddedTriton(tiny_repository, address="127.0.0.1", startup_timeout=120, **triton_ports).start()
        deadline = time.monotonic() + 30
        while (status := httpx.post(f"{gateway}/analyze", files=files, timeout=60).status_code) != 200:
            assert time.monotonic() < deadline, f"gateway did not recover (last status {status})"
            time.sleep(0.5)
        assert httpx.get(f"{gateway}/readyz", timeout=5).status_code == 200
        # The gRPC server has its own Triton channel: it too recovers by itself (reconnect backoff <= 1 s).
        deadline = time.monotonic() + 30
        while True:
            try:
                assert _grpc_analyze(ports["grpc"], slice_jpeg).label
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc
                time.sleep(0.5)
    finally:
        served.stop()
        triton.stop()

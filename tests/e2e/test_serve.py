"""`braintumor serve` as a user runs it: one subprocess brings up Triton, the HTTP gateway and the gRPC API; the same
image over HTTP and gRPC gives ONNX Runtime's answer; metrics move; SIGTERM leaves nothing behind. And the fault
drill: Triton SIGKILLed while requests flow -> fast 503 / UNAVAILABLE, not ready once it is gone, recovery by
itself."""

import base64
import os
import signal

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

from .conftest import Load  # noqa: E402

pytestmark = pytest.mark.e2e


def _grpc_analyze(port: int, data: bytes):
    from braintumor.clients.v1 import braintumor_pb2, braintumor_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return braintumor_pb2_grpc.BrainTumorStub(channel).Analyze(braintumor_pb2.AnalyzeRequest(image=data),
                                                                   timeout=60)


@pytest.mark.parametrize("backend", ["triton", "onnxruntime"])
def test_serve_http_and_grpc_agree_with_onnxruntime(backend, tiny_repository, slice_jpeg, serve_factory, proc_tree,
                                                    request):
    """Both backends: the embedded Triton (the default; the session's instance, started with the same flags, whose
    clean SIGTERM stop the `served` fixture checks at its end) and `--backend onnxruntime` (the model in each front
    door, no Triton process at all; started and stopped here) give ONNX Runtime's answer."""
    if backend == "triton":
        served = request.getfixturevalue("served")
    else:
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
        if backend == "onnxruntime":  # the session's instance is stopped and checked at the session's end
            code = served.stop()
    if backend == "onnxruntime":
        assert code == 0, "".join(lines[-40:])
        # SIGKILL of the group in stop() does not reach the children: each runs in its own process group
        assert not proc_tree.alive(children), "processes outlived `braintumor serve`"


def test_triton_killed_under_load_then_back(tiny_repository, slice_jpeg, serve_factory):
    """External Triton (--triton-url) SIGKILLed while HTTP and gRPC requests flow: once it is gone the gateway is not
    ready at its very next probe; every request while it is down fails fast as 503 / UNAVAILABLE (none waits for its
    30 s timeout, none is a 500, the doors stay up); brought back on the same ports, both doors recover by themselves.
    (Killing each part of a supervised `serve` is the slow test in test_serve_recovery.py.)"""
    triton_ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    triton = EmbeddedTriton(tiny_repository, address="127.0.0.1", startup_timeout=120, **triton_ports).start()
    key = triton.client_key
    served = serve_factory("--triton-url", triton.grpc_url, env={"BRAINTUMOR_TRITON_KEY": key})
    readyz = f"{served.http_url}/readyz"
    try:
        with Load(served, slice_jpeg) as load:
            load.wait_for(lambda: load.http[200] and load.grpc["OK"], 60, "no answer on both doors before the kill")
            os.kill(triton.pid, signal.SIGKILL)
            assert triton.wait() == -signal.SIGKILL  # reaped: nothing listens on its ports any more
            assert httpx.get(readyz, timeout=10).status_code == 503, "ready after Triton died"
            down = (load.http[503], load.grpc["UNAVAILABLE"])
            load.wait_for(lambda: load.http[503] >= down[0] + 3 and load.grpc["UNAVAILABLE"] >= down[1] + 3, 60,
                          "requests did not fail while Triton was down")
            assert httpx.get(readyz, timeout=10).status_code == 503
            triton.stop()  # its python stubs and shared memory, as serve's supervisor does before a restart
            triton = EmbeddedTriton(tiny_repository, address="127.0.0.1", startup_timeout=120, client_key=key,
                                    **triton_ports).start()
            back = (load.http[200], load.grpc["OK"])
            load.wait_for(lambda: load.http[200] > back[0] and load.grpc["OK"] > back[1], 60,
                          "a door did not recover by itself")
        assert httpx.get(readyz, timeout=10).status_code == 200
        print(f"HTTP outcomes {dict(load.http)}; gRPC outcomes {dict(load.grpc)}; slowest (s) {load.slowest}")
        assert set(load.http) == {200, 503}, load.http  # no 500, and the gateway itself never went away
        assert set(load.grpc) == {"OK", "UNAVAILABLE"}, load.grpc
        # fail fast: each refusal well inside the 30 s Triton call timeout a hanging request would wait for
        assert load.slowest[503] < 5.0 and load.slowest["UNAVAILABLE"] < 5.0, load.slowest
    finally:
        served.stop()
        triton.stop()

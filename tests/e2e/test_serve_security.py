"""`braintumor serve` with an API key, as an outsider and as a hospital client meet it (issue 13): every gRPC method
needs the key (health and reflection do not); a DICOM with patient data sent through the gateway, the gRPC API and
`braintumor score` leaves no trace of that data in anything the service prints or writes (logs of all processes,
task store, temporary files, metrics) nor in the score results."""

import base64
import os
import subprocess
import sys

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
grpc = pytest.importorskip("grpc")
pytest.importorskip("bentoml")
pytest.importorskip("pytriton")
pydicom = pytest.importorskip("pydicom")

from braintumor.serving.triton_embedded import free_port  # noqa: E402

pytestmark = pytest.mark.e2e

KEY = "e2e-s3cret"
def _needles(phi: dict[str, str]) -> dict[str, bytes]:
    """Each PHI value as bytes, and base64 of it at the three alignments (a stored body is often base64)."""
    needles = {}
    for value in phi.values():
        raw = value.encode()
        needles[value] = raw
        for shift in range(3):
            encoded = base64.b64encode(b"\0" * shift + raw)[4:-4]  # the part that does not depend on neighbours
            if len(encoded) >= 6:
                needles[f"base64({value})+{shift}"] = encoded
    return needles


def _scan(blobs: dict[str, bytes], phi: dict[str, str]) -> list[str]:
    return [f"{name}: {needle_name}" for name, blob in blobs.items() for needle_name, needle in _needles(phi).items()
            if needle in blob]


@pytest.fixture(scope="module")
def keyed(tiny_repository, tmp_path_factory):
    from .conftest import start_serve

    root = tmp_path_factory.mktemp("serve_security")
    env = {"BRAINTUMOR_API_KEY": KEY, "TMPDIR": str(root / "tmp"), "BENTOML_HOME": str(root / "bentoml")}
    (root / "tmp").mkdir()
    served = start_serve("--model-repository", str(tiny_repository), "--triton-http-port", str(free_port()),
                         "--triton-grpc-port", str(free_port()), "--triton-metrics-port", str(free_port()), env=env)
    try:
        yield served, root
    finally:
        served.stop()


def _stub(served):
    from braintumor.clients.v1 import braintumor_pb2_grpc

    channel = grpc.insecure_channel(served.grpc_target)
    return channel, braintumor_pb2_grpc.BrainTumorStub(channel)


def test_every_rpc_needs_the_key_but_health_and_reflection(keyed, slice_jpeg):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from braintumor.clients.v1 import braintumor_pb2 as pb

    served, _ = keyed
    channel, stub = _stub(served)
    with channel:
        calls = {
            "Analyze": lambda md: stub.Analyze(pb.AnalyzeRequest(image=slice_jpeg), metadata=md, timeout=30),
            "AnalyzeStream": lambda md: list(stub.AnalyzeStream(iter([pb.AnalyzeRequest(image=slice_jpeg)]),
                                                                metadata=md, timeout=30)),
            "Explain": lambda md: stub.Explain(pb.ExplainRequest(image=slice_jpeg, method="gradcam"), metadata=md,
                                               timeout=30),
            "GetModelInfo": lambda md: stub.GetModelInfo(pb.ModelInfoRequest(), metadata=md, timeout=30),
        }
        service = pb.DESCRIPTOR.services_by_name["BrainTumor"]
        assert set(calls) == {m.name for m in service.methods}, "an RPC was added without a key check here"
        # With the key each RPC answers in full: a protobuf reply is truthy even when empty, so check its content.
        classes = list(stub.GetModelInfo(pb.ModelInfoRequest(), metadata=[("x-api-key", KEY)], timeout=30).classes)
        assert len(classes) == 4, classes

        def analyzed(reply) -> bool:
            return (reply.label in classes and set(reply.probabilities) == set(classes)
                    and abs(sum(reply.probabilities.values()) - 1) < 1e-3
                    and (reply.image_height, reply.image_width) == (64, 56))

        answered = {
            "Analyze": analyzed,
            "AnalyzeStream": lambda replies: len(replies) == 1 and analyzed(replies[0]),
            "Explain": lambda reply: (reply.method == "gradcam" and reply.label in classes
                                      and reply.heatmap_png.startswith(b"\x89PNG")),
            "GetModelInfo": lambda reply: list(reply.classes) == classes and bool(reply.name),
        }
        # ... and the checks would see an empty answer
        empty = {"Analyze": pb.AnalyzeResponse(), "AnalyzeStream": [pb.AnalyzeResponse()],
                 "Explain": pb.ExplainResponse(), "GetModelInfo": pb.ModelInfo()}
        assert not any(answered[name](reply) for name, reply in empty.items())
        for name, call in calls.items():
            for metadata in ([], [("x-api-key", "guess")], [("authorization", "Bearer guess")]):
                with pytest.raises(grpc.RpcError) as refused:
                    call(metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, metadata)
            reply = call([("x-api-key", KEY)])
            assert answered[name](reply), (name, reply)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        listed = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        assert any("braintumor.v1.BrainTumor" in s.name for r in listed for s in r.list_services_response.service)


def test_patient_data_leaves_no_trace(keyed, tmp_path, phi, phi_dicom):
    from braintumor.clients.v1 import braintumor_pb2 as pb

    served, root = keyed
    dicom = phi_dicom
    auth = {"x-api-key": KEY}
    # the gateway: analyze (multipart and JSON), a synchronous explanation, a task fetched and one left unfetched
    for kwargs in ({"files": {"image": ("slice.dcm", dicom, "application/dicom")}},
                   {"json": {"image_base64": base64.b64encode(dicom).decode()}}):
        answer = httpx.post(f"{served.http_url}/analyze", headers=auth, timeout=60, **kwargs)
        assert answer.status_code == 200, answer.text
        assert answer.json()["tumor_area_mm2"] is not None  # the DICOM's pixel spacing was read
        assert not _scan({"HTTP answer": answer.content}, phi)
    assert httpx.post(f"{served.http_url}/explain", headers=auth, timeout=60,
                      files={"image": ("slice.dcm", dicom, "application/dicom")},
                      data={"method": "gradcam"}).status_code == 200
    tasks = [httpx.post(f"{served.http_url}/explain/submit", headers=auth, timeout=60,
                        files={"image": ("slice.dcm", dicom, "application/dicom")},
                        data={"method": "gradcam"}).json()["task_id"] for _ in range(2)]
    import time

    for task_id in tasks:
        deadline = time.monotonic() + 60
        while httpx.get(f"{served.http_url}/explain/status", params={"task_id": task_id}, headers=auth,
                        timeout=30).json()["status"] == "in_progress":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert httpx.get(f"{served.http_url}/explain/get", params={"task_id": tasks[0]}, headers=auth,
                     timeout=30).status_code == 200
    # the gRPC API
    channel, stub = _stub(served)
    with channel:
        reply = stub.Analyze(pb.AnalyzeRequest(image=dicom), metadata=[("x-api-key", KEY)], timeout=60)
        assert reply.label and not _scan({"gRPC answer": reply.SerializeToString()}, phi)
        stub.Explain(pb.ExplainRequest(image=dicom, method="gradcam"), metadata=[("x-api-key", KEY)], timeout=60)
    # `braintumor score`, over both protocols
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "slice.dcm").write_bytes(dicom)
    outputs = {}
    for protocol, url in (("grpc", served.grpc_target), ("http", served.http_url)):
        out = tmp_path / f"{protocol}.csv"
        done = subprocess.run([sys.executable, "-m", "braintumor.serving.cli", "score", "--no-progress", str(inputs),
                               "--out", str(out), "--protocol", protocol, "--url", url, "--masks",
                               str(tmp_path / f"masks_{protocol}")], capture_output=True, timeout=300,
                              env={**os.environ, "BRAINTUMOR_API_KEY": KEY})
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
        outputs[f"score {protocol} output"] = done.stdout + done.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.parent != inputs:
            outputs[f"score file {path.name}"] = path.read_bytes()
    # everything the service printed or wrote: the logs of serve and its children, its task store and temporary
    # files, BentoML's home, and both metrics endpoints
    written = {"serve log (all processes)": "".join(served.lines).encode()}
    for path in root.rglob("*"):
        if path.is_file():
            written[str(path.relative_to(root))] = path.read_bytes()
    written["gateway /metrics"] = httpx.get(f"{served.http_url}/metrics", timeout=30).content
    written["gRPC /metrics"] = httpx.get(f"http://127.0.0.1:{served.ports['grpc_metrics']}/metrics",
                                         timeout=30).content
    assert any(name.endswith("task_result.db") for name in written), sorted(written)  # the task store was scanned
    assert not _scan(written, phi), _scan(written, phi)
    assert not _scan(outputs, phi), _scan(outputs, phi)
    # the pixels did go through: the scan would have seen the DICOM if it had been kept
    assert not any(b"DICM" in blob for blob in written.values())


def test_the_scan_finds_what_it_looks_for(phi, phi_dicom):
    """The scan is not blind: raw and base64-encoded patient data in a blob are both found."""
    dicom = phi_dicom
    assert _scan({"raw": dicom}, phi) and _scan({"base64": base64.b64encode(b"xy" + dicom)}, phi)
    assert not _scan({"pixels": np.zeros(100, np.uint8).tobytes()}, phi)

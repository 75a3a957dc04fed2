"""`braintumor grpc-server` as a process: it listens, answers health and metrics, reports a missing Triton as
UNAVAILABLE / NOT_SERVING, requires the key taken from --api-key-env, and SIGTERM stops it cleanly (exit 0)."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("grpc_health.v1")
pytest.importorskip("prometheus_client")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from braintumor.clients.v1 import braintumor_pb2 as pb  # noqa: E402
from braintumor.clients.v1 import braintumor_pb2_grpc as pb_grpc  # noqa: E402
from braintumor.serving.triton_embedded import free_port  # noqa: E402

pytestmark = pytest.mark.e2e


def test_grpc_server_command_lifecycle():
    port, metrics_port, nowhere = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "braintumor.serving.cli", "grpc-server", "--host", "127.0.0.1", "--port", str(port),
           "--metrics-port", str(metrics_port), "--triton-url", f"127.0.0.1:{nowhere}", "--api-key-env", "GRPC_KEY",
           "--grace", "1"]
    env = {**os.environ, "GRPC_KEY": "s3cret", "BRAINTUMOR_TRITON_TIMEOUT_S": "2"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.stdout.read()
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "grpc-server did not start listening"
                    time.sleep(0.2)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING  # health is open; Triton is not there

            stub = pb_grpc.BrainTumorStub(channel)
            with pytest.raises(grpc.RpcError) as no_key:
                stub.Analyze(pb.AnalyzeRequest(image=b"x"), timeout=10)
            assert no_key.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as down:
                stub.GetModelInfo(pb.ModelInfoRequest(), metadata=[("x-api-key", "s3cret")], timeout=10)
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        counts = {(s.labels["endpoint"], s.labels["status"]): s.value
                  for family in text_string_to_metric_families(text) if family.name == "braintumor_requests"
                  for s in family.samples if s.name.endswith("_total") and s.labels["frontend"] == "grpc"}
        assert counts == {("Analyze", "UNAUTHENTICATED"): 1, ("GetModelInfo", "UNAVAILABLE"): 1}

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "s3cret" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

"""`braintumor serve` heals itself (issue 13): Triton, the gateway and the gRPC API are each SIGKILLed while requests
flow; each comes back by itself, the other parts stay up, and no request gets a 500 / INTERNAL. And SIGKILL of
`serve` itself leaves no process behind."""

import os
import signal
import time

import pytest

httpx = pytest.importorskip("httpx")
grpc = pytest.importorskip("grpc")
pytest.importorskip("bentoml")
pytest.importorskip("pytriton")

from braintumor.serving.triton_embedded import free_port  # noqa: E402

from .conftest import Load  # noqa: E402

pytestmark = pytest.mark.e2e
RECOVERY_S = 90  # Triton's restart includes loading the model; on 2 busy CPU cores it took ~10-20 s


def _child(served, needle: str, procs) -> int:
    """The direct child of `serve` whose command line holds ``needle``."""
    table = procs.table()
    pids = [pid for pid, (ppid, cmd, zombie) in table.items()
            if ppid == served.proc.pid and needle in cmd and not zombie]
    assert len(pids) == 1, (needle, pids)
    return pids[0]


def _healthy(served, image: bytes) -> bool:
    from braintumor.clients.v1 import braintumor_pb2, braintumor_pb2_grpc

    try:
        if httpx.get(f"{served.http_url}/readyz", timeout=5).status_code != 200:
            return False
        if httpx.post(f"{served.http_url}/analyze", files={"image": ("s.jpg", image, "image/jpeg")},
                      timeout=30).status_code != 200:
            return False
        with grpc.insecure_channel(served.grpc_target) as channel:
            braintumor_pb2_grpc.BrainTumorStub(channel).Analyze(braintumor_pb2.AnalyzeRequest(image=image), timeout=30)
        return True
    except (httpx.HTTPError, grpc.RpcError):
        return False


def _serve(serve_factory, tiny_repository):
    return serve_factory("--model-repository", str(tiny_repository), "--triton-http-port", str(free_port()),
                         "--triton-grpc-port", str(free_port()), "--triton-metrics-port", str(free_port()))


@pytest.mark.slow
def test_each_part_killed_under_load_comes_back_without_a_500(tiny_repository, slice_jpeg, serve_factory, proc_tree):
    served = _serve(serve_factory, tiny_repository)
    recovery = {}
    with Load(served, slice_jpeg) as load:
        time.sleep(2)
        for part in ("tritonserver", "bentoml serve", "grpc-server"):
            victim = _child(served, part, proc_tree)
            family = {victim, *proc_tree.descendants(victim)}  # BentoML's workers run in their own sessions
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            time.sleep(1)
            while not _healthy(served, slice_jpeg):
                assert time.monotonic() - killed < RECOVERY_S, f"{part} did not come back:\n" + "".join(
                    served.lines[-40:])
                time.sleep(0.5)
            recovery[part] = round(time.monotonic() - killed, 1)
            assert _child(served, part, proc_tree) != victim
            assert not proc_tree.alive(family), f"{part} left processes behind"
            assert served.proc.poll() is None, "serve exited"
            time.sleep(2)
    print(f"recovery seconds {recovery}; HTTP outcomes {dict(load.http)}; gRPC outcomes {dict(load.grpc)}")
    assert load.http[200] > 0 and load.grpc["OK"] > 0
    assert set(load.http) <= {200, 503, "ConnectError", "RemoteProtocolError", "ReadError"}, load.http
    assert set(load.grpc) <= {"OK", "UNAVAILABLE"}, load.grpc
    assert load.http[503] > 0 and load.grpc["UNAVAILABLE"] > 0  # the drills did take parts down under load
    log = "".join(served.lines)
    assert "Triton exited" in log and "HTTP gateway exited" in log and "gRPC API exited" in log


def test_sigkill_of_serve_leaves_no_process_behind(tiny_repository, serve_factory, proc_tree):
    served = _serve(serve_factory, tiny_repository)
    family = proc_tree.descendants(served.proc.pid)
    for part in ("tritonserver", "triton_python_backend_stub", "bentoml serve", "grpc-server"):
        assert any(part in cmd for cmd in family.values()), (part, family)
    os.kill(served.proc.pid, signal.SIGKILL)
    served.proc.wait(timeout=10)
    deadline = time.monotonic() + 30
    while left := proc_tree.alive(family):
        assert time.monotonic() < deadline, f"outlived a SIGKILLed serve: {left}"
        time.sleep(0.2)

"""The real tritonserver from the nvidia-pytriton wheel on a freshly exported tiny model: HTTP and gRPC results equal
ONNX Runtime's, metadata and metrics are served, a corrupted model refuses to load, and nothing outlives a stop."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="the embedded Triton needs the nvidia-pytriton wheel")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
ort = pytest.importorskip("onnxruntime")

from braintumor.export import contract  # noqa: E402
from braintumor.serving.settings import TRITON_GRPC_KEY_HEADER, TRITON_KEY_HEADER  # noqa: E402
from braintumor.serving.triton_embedded import EmbeddedTriton, TritonServerError, free_port  # noqa: E402

pytestmark = pytest.mark.e2e

SIZE = 32  # the image size of the session's tiny model (tests/conftest.py TINY_SIZE, tiny_ood_repository)
# Triton moves the same float32 bytes ORT produced; only batching could change the arithmetic.
ATOL, RTOL = 1e-5, 1e-5


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (our unique repository path)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((line for line in (proc / "status").read_text().splitlines() if line.startswith("State:")), "")
        except OSError:
            continue
        if text in cmdline and "zombie" not in state:
            found.append(f"{proc.name}: {cmdline}")
    return found


def _wait_gone(text: str, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := _processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture(scope="module")
def repository(tiny_ood_repository, tmp_path_factory):
    """A copy of the session's tiny model with a fitted OOD score, exported (tests/conftest.py; test_export.py checks
    that export as written): Triton serves ood_score (B, 1) like the release model. A copy, because Triton's python
    backend writes __pycache__ into the version folders it loads."""
    import shutil

    copy = tmp_path_factory.mktemp("triton_e2e") / "repo"
    shutil.copytree(tiny_ood_repository[0], copy)
    return copy


def _inference_count(triton: EmbeddedTriton, model: str) -> float:
    """``nv_inference_count`` of ``model`` (version 1) from the Prometheus endpoint; warm-up requests count too."""
    with urllib.request.urlopen(triton.metrics_url, timeout=5) as response:
        metrics = response.read().decode()
    assert "nv_inference_request_success" in metrics
    lines = [line for line in metrics.splitlines()
             if line.startswith("nv_inference_count{") and f'model="{model}"' in line]
    assert lines, "no nv_inference_count for the model"
    return float(lines[0].rsplit(" ", 1)[1])


def _ports() -> dict:
    return {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}


def test_http_and_grpc_equal_onnxruntime(repository):
    name = contract.DEFAULT_NAME
    images = np.random.default_rng(0).integers(0, 256, (3, 1, SIZE, SIZE), dtype=np.uint8)
    session = ort.InferenceSession(str(repository / name / "1" / contract.ONNX_FILE), providers=["CPUExecutionProvider"])
    expected = dict(zip(contract.FULL_OUTPUTS, session.run(list(contract.FULL_OUTPUTS), {contract.INPUT_NAME: images})))

    triton = EmbeddedTriton(repository, address="127.0.0.1", startup_timeout=60, **_ports())
    try:
        triton.start()
        assert triton.is_running()

        http = httpclient.InferenceServerClient(triton.http_url)
        _client_apis_refused_without_the_key(triton, images)
        keyed = {TRITON_KEY_HEADER: triton.client_key}  # what only our front doors are given
        grpc_keyed = {TRITON_GRPC_KEY_HEADER: triton.client_key}
        meta = http.get_model_metadata(name, headers=keyed)
        assert [i["name"] for i in meta["inputs"]] == [contract.INPUT_NAME]
        assert meta["inputs"][0]["datatype"] == "UINT8" and meta["inputs"][0]["shape"] == [-1, 1, SIZE, SIZE]
        assert [o["name"] for o in meta["outputs"]] == list(contract.FULL_OUTPUTS)
        assert http.is_model_ready(contract.classifier_name(name))
        before = _inference_count(triton, name)

        inp = httpclient.InferInput(contract.INPUT_NAME, list(images.shape), "UINT8")
        inp.set_data_from_numpy(images, binary_data=True)
        result = http.infer(name, [inp], outputs=[httpclient.InferRequestedOutput(o) for o in contract.FULL_OUTPUTS],
                            headers=keyed)
        for out in contract.FULL_OUTPUTS:
            np.testing.assert_allclose(result.as_numpy(out), expected[out], atol=ATOL, rtol=RTOL, err_msg=f"HTTP {out}")

        grpc = grpcclient.InferenceServerClient(triton.grpc_url)
        ginp = grpcclient.InferInput(contract.INPUT_NAME, list(images.shape), "UINT8")
        ginp.set_data_from_numpy(images)
        result = grpc.infer(name, [ginp], outputs=[grpcclient.InferRequestedOutput(o) for o in contract.FULL_OUTPUTS],
                            headers=grpc_keyed)
        for out in contract.FULL_OUTPUTS:
            np.testing.assert_allclose(result.as_numpy(out), expected[out], atol=ATOL, rtol=RTOL, err_msg=f"gRPC {out}")
        probs = result.as_numpy(contract.CLASS_PROBS)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

        assert _inference_count(triton, name) - before == 2 * len(images)
        _admin_apis_refused(http, grpc)
        # Triton waits --exit-timeout-secs for open client connections (even idle keep-alive ones) before exiting
        http.close()
        grpc.close()
    finally:
        code = triton.stop()
    assert code == 0, triton.log_tail()
    assert not _wait_gone(str(repository)), "tritonserver or a python stub outlived stop()"


def test_throughput_layout_runs_more_instances_with_the_same_answers(repository):
    """`--layout throughput`: the real Triton loads each model's configs/throughput.pbtxt (more instances) and
    answers exactly as ONNX Runtime does."""
    name = contract.DEFAULT_NAME
    images = np.random.default_rng(1).integers(0, 256, (2, 1, SIZE, SIZE), dtype=np.uint8)
    session = ort.InferenceSession(str(repository / name / "1" / contract.ONNX_FILE), providers=["CPUExecutionProvider"])
    expected = session.run([contract.CLASS_PROBS], {contract.INPUT_NAME: images})[0]
    triton = EmbeddedTriton(repository, address="127.0.0.1", startup_timeout=60, layout="throughput", **_ports())
    try:
        triton.start()
        grpc = grpcclient.InferenceServerClient(triton.grpc_url)
        keyed = {TRITON_GRPC_KEY_HEADER: triton.client_key}
        for model in (name, contract.classifier_name(name)):
            config = grpc.get_model_config(model, as_json=True, headers=keyed)["config"]
            assert int(config["instance_group"][0]["count"]) == contract.THROUGHPUT_INSTANCES, model
        ginp = grpcclient.InferInput(contract.INPUT_NAME, list(images.shape), "UINT8")
        ginp.set_data_from_numpy(images)
        result = grpc.infer(name, [ginp], outputs=[grpcclient.InferRequestedOutput(contract.CLASS_PROBS)],
                            headers=keyed)
        np.testing.assert_allclose(result.as_numpy(contract.CLASS_PROBS), expected, atol=ATOL, rtol=RTOL)
        grpc.close()
    finally:
        code = triton.stop()
    assert code == 0, triton.log_tail()


def _client_apis_refused_without_the_key(triton: EmbeddedTriton, images: np.ndarray) -> None:
    """Another process on this host (no key, or a wrong one) gets no diagnosis, no model config (temperature,
    thresholds, preprocessing) and no metadata from Triton over HTTP or gRPC (issue 25); health still answers."""
    from tritonclient.utils import InferenceServerException

    name = contract.DEFAULT_NAME
    for headers in ({}, {TRITON_KEY_HEADER: "wrong"}, {TRITON_GRPC_KEY_HEADER: "wrong"}):
        http = httpclient.InferenceServerClient(triton.http_url)
        grpc = grpcclient.InferenceServerClient(triton.grpc_url)
        inp = httpclient.InferInput(contract.INPUT_NAME, list(images.shape), "UINT8")
        inp.set_data_from_numpy(images, binary_data=True)
        ginp = grpcclient.InferInput(contract.INPUT_NAME, list(images.shape), "UINT8")
        ginp.set_data_from_numpy(images)
        # each call gets its own copy: tritonclient's HTTP infer adds a header to the dict it is given
        calls = {
            "HTTP infer": lambda: http.infer(name, [inp], headers=dict(headers)),
            "HTTP model config": lambda: http.get_model_config(name, headers=dict(headers)),
            "HTTP model metadata": lambda: http.get_model_metadata(name, headers=dict(headers)),
            "HTTP server metadata": lambda: http.get_server_metadata(headers=dict(headers)),
            "gRPC infer": lambda: grpc.infer(name, [ginp], headers=dict(headers)),
            "gRPC model config": lambda: grpc.get_model_config(name, headers=dict(headers)),
            "gRPC model metadata": lambda: grpc.get_model_metadata(name, headers=dict(headers)),
        }
        for what, call in calls.items():
            with pytest.raises(InferenceServerException) as refused:
                call()
            assert "restricted" in str(refused.value).lower(), (what, headers, refused.value)
        assert http.is_server_ready() and grpc.is_server_ready() and grpc.is_model_ready(name)
        http.close()
        grpc.close()


def _admin_apis_refused(http, grpc) -> None:
    """Nobody can change the log level, read the repository index, register shared memory or read statistics
    (issue 13: all of these answered anyone before); the client key is no admin key either."""
    from tritonclient.utils import InferenceServerException

    calls = {
        "HTTP logging": lambda: http.update_log_settings({"log_verbose_level": 2}),
        "HTTP repository index": lambda: http.get_model_repository_index(),
        "HTTP shared memory": lambda: http.register_system_shared_memory("probe", "/braintumor_probe", 64),
        "HTTP statistics": lambda: http.get_inference_statistics(),
        "HTTP trace": lambda: http.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
        "HTTP read log settings": lambda: http.get_log_settings(),
        "gRPC logging": lambda: grpc.update_log_settings({"log_verbose_level": 2}),
        "gRPC repository index": lambda: grpc.get_model_repository_index(),
        "gRPC shared memory": lambda: grpc.register_system_shared_memory("probe", "/braintumor_probe", 64),
    }
    for what, call in calls.items():
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert "restricted" in str(refused.value).lower(), (what, refused.value)


def test_corrupted_model_refuses_to_load(repository, tmp_path):
    import shutil

    broken = tmp_path / "repo"
    shutil.copytree(repository, broken)
    onnx_file = broken / contract.DEFAULT_NAME / "1" / contract.ONNX_FILE
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 0xFF
    onnx_file.write_bytes(bytes(data))

    triton = EmbeddedTriton(broken, address="127.0.0.1", startup_timeout=60, **_ports())
    with pytest.raises(TritonServerError, match="exited with code") as info:
        triton.start()
    assert "sha256" in str(info.value), "the error must carry the server's reason"
    assert not triton.is_running()
    assert not _wait_gone(str(broken))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_stops_cleanly_on_signal(repository, sig, tmp_path):
    ports = _ports()
    key_file = tmp_path / "triton.key"
    cmd = [sys.executable, "-m", "braintumor.serving.cli", "triton", "--model-repository", str(repository),
           "--address", "127.0.0.1", "--quiet", "--http-port", str(ports["http_port"]),
           "--grpc-port", str(ports["grpc_port"]), "--metrics-port", str(ports["metrics_port"]),
           "--key-file", str(key_file)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRAINTUMOR_TRITON_KEY")}
    cli = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        ready = f"http://127.0.0.1:{ports['http_port']}/v2/health/ready"
        while True:
            assert cli.poll() is None, cli.stdout.read()
            try:
                with urllib.request.urlopen(ready, timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "not ready in 60 s"
            time.sleep(0.2)
        # no key given: a new one was written for the front doors, readable by this user only, and it works
        assert key_file.stat().st_mode & 0o777 == 0o600
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{ports['grpc_port']}")
        key = key_file.read_text().strip()
        assert grpc.get_model_config(contract.DEFAULT_NAME, headers={TRITON_GRPC_KEY_HEADER: key})
        grpc.close()
        cli.send_signal(sig)
        assert cli.wait(timeout=30) == 0
        output = cli.stdout.read()
        assert "ready on" in output and "stopped (exit code 0)" in output, output
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert not _wait_gone(str(repository)), "the CLI left tritonserver or a stub running"


def test_port_in_use_fails_before_starting(repository):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        ports = {**_ports(), "http_port": held.getsockname()[1]}
        with pytest.raises(ValueError, match="http port .* already in use"):
            EmbeddedTriton(repository, address="127.0.0.1", **ports).start()
    assert os.path.isdir(repository)


def test_a_killed_server_leaves_no_shared_memory_behind(tiny_repository):
    """Issue 25: after `kill -9` of tritonserver its python-backend regions stayed in /dev/shm for good. The instance
    names its regions with its own prefix and removes them once the server is gone, before a restart too."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm on this host")
    triton = EmbeddedTriton(tiny_repository, address="127.0.0.1", startup_timeout=60, **_ports())
    regions = lambda: sorted(p.name for p in shm.glob(f"{triton.shm_prefix}*"))  # noqa: E731
    try:
        triton.start()
        assert regions(), "the python backend made no region under this instance's prefix"
        os.kill(triton.pid, signal.SIGKILL)
        triton._process.wait(timeout=30)
        assert regions(), "a SIGKILLed server cannot remove its own regions"
        triton.stop()  # what `braintumor serve`'s supervisor does with a dead Triton before it restarts it
        assert not regions()
        triton.start()  # and the restart works
        assert triton.is_running() and regions()
    finally:
        triton.stop()
    assert not regions()


def _backend_with_a_stub_that_cannot_start(install_dir: Path) -> Path:
    """A --backend-directory whose python stub dies at once the way a stub without its libpython dies (the dynamic
    loader's message, exit 127): the real libtriton_python.so and utils, the stub replaced by a shell script padded
    to the real stub's size (assemble_backend_dir keeps a cached copy whose sizes match)."""
    from braintumor.serving import triton_embedded as te

    install = te.find_triton()
    real = te.assemble_backend_dir(install)
    target = install_dir / "triton-backends" / real.name / "python"
    target.mkdir(parents=True)
    for name in (te.BACKEND_LIB, te.BACKEND_UTILS):
        (target / name).write_bytes((real / "python" / name).read_bytes())
    script = (b"#!/bin/sh\necho \"$0: error while loading shared libraries: libpython3.11.so.1.0: cannot open shared "
              b"object file: No such file or directory\" >&2\nexit 127\n")
    size = (real / "python" / te.STUB_NAME).stat().st_size
    (target / te.STUB_NAME).write_bytes(script + b"#" * (size - len(script)))
    (target / te.STUB_NAME).chmod(0o755)
    return install_dir


def test_a_stub_that_dies_at_start_ends_the_start_with_its_error(tiny_repository, tmp_path):
    """Issue 22 item 7: a python stub that cannot start left tritonserver (and `braintumor serve`, and a container)
    waiting for minutes without a word. The start now ends within seconds with the stub's own error."""
    cache = _backend_with_a_stub_that_cannot_start(tmp_path / "cache")
    triton = EmbeddedTriton(tiny_repository, address="127.0.0.1", startup_timeout=120, cache_dir=cache, **_ports())
    start = time.monotonic()
    with pytest.raises(TritonServerError, match="died while the models were loading") as failed:
        triton.start()
    assert time.monotonic() - start < 60  # the timeout is 120 s; the fake stub dies within a second of its spawn
    assert "libpython3.11.so.1.0: cannot open shared object file" in str(failed.value)
    assert not triton.is_running()


def test_serve_exits_non_zero_with_the_stubs_error(tiny_repository, tmp_path):
    """The same through `braintumor serve` (what the all-in-one container runs): exit code 1, the reason on stderr."""
    cache = _backend_with_a_stub_that_cannot_start(tmp_path / "cache")
    ports = [str(free_port()) for _ in range(6)]
    cmd = [sys.executable, "-m", "braintumor.serving.cli", "serve", "--model-repository", str(tiny_repository),
           "--http-port", ports[0], "--grpc-port", ports[1], "--grpc-metrics-port", ports[2],
           "--triton-http-port", ports[3], "--triton-grpc-port", ports[4], "--triton-metrics-port", ports[5],
           "--startup-timeout", "120"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=100,
                          env={**os.environ, "BRAINTUMOR_CACHE": str(cache)})
    assert done.returncode == 1, done.stderr[-3000:]
    assert "died while the models were loading" in done.stderr and "libpython3.11.so.1.0" in done.stderr

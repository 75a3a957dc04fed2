"""Embedded Triton without the real server: locating the wheel, backend directory, environment, ports, repository,
and the process lifecycle (readiness, early exit, timeout, group stop) against a fake tritonserver script."""

import socket
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from braintumor.serving import triton_embedded as te
from braintumor.serving import triton_install
from braintumor.serving.cli import build_parser


def _fake_install(root: Path, pythons=("3.10", "3.11", "3.12")) -> te.TritonInstall:
    """The wheel's layout with placeholder files: site-packages/{pytriton/tritonserver, nvidia_pytriton.libs}."""
    tritonserver = root / "pytriton" / "tritonserver"
    (tritonserver / "bin").mkdir(parents=True)
    (tritonserver / "bin" / "tritonserver").write_text("binary")
    backend = tritonserver / "backends" / "python"
    backend.mkdir(parents=True)
    (backend / te.BACKEND_LIB).write_text("lib")
    (backend / te.BACKEND_UTILS).write_text("utils")
    for version in pythons:
        stub = tritonserver / "python_backend_stubs" / version / te.STUB_NAME
        stub.parent.mkdir(parents=True)
        stub.write_text(f"stub {version}")
    (root / "nvidia_pytriton.libs").mkdir()
    return te.TritonInstall("0.7.0", tritonserver)


def _model(repo: Path, name: str = "m") -> Path:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "python"\n')
    return repo


def test_backend_dir_has_the_backend_and_the_stub_for_this_python(tmp_path):
    install = _fake_install(tmp_path / "site")
    root = te.assemble_backend_dir(install, tmp_path / "cache", python=(3, 11))
    python = root / "python"
    assert sorted(p.name for p in python.iterdir()) == sorted([te.BACKEND_LIB, te.BACKEND_UTILS, te.STUB_NAME])
    assert (python / te.STUB_NAME).read_text() == "stub 3.11"
    assert (python / te.STUB_NAME).stat().st_mode & 0o111, "the stub must be executable"
    assert root.name == "nvidia-pytriton-0.7.0-py3.11"
    # idempotent, and no staging folders left behind
    assert te.assemble_backend_dir(install, tmp_path / "cache", python=(3, 11)) == root
    assert [p.name for p in root.iterdir()] == ["python"]


def test_backend_dir_is_rebuilt_when_the_wheel_changed(tmp_path):
    install = _fake_install(tmp_path / "site")
    root = te.assemble_backend_dir(install, tmp_path / "cache", python=(3, 11))
    (install.stubs / "3.11" / te.STUB_NAME).write_text("a newer, longer stub")
    te.assemble_backend_dir(install, tmp_path / "cache", python=(3, 11))
    assert (root / "python" / te.STUB_NAME).read_text() == "a newer, longer stub"


def test_missing_stub_names_the_python_versions_it_has(tmp_path):
    install = _fake_install(tmp_path / "site", pythons=("3.10", "3.12"))
    with pytest.raises(te.TritonServerError, match=r"no python backend stub for Python 3\.11 \(it has 3\.10, 3\.12\)"):
        te.assemble_backend_dir(install, tmp_path / "cache", python=(3, 11))


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(te.CACHE_ENV, str(tmp_path / "c"))
    assert te.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(te.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert te.default_cache_dir() == tmp_path / "xdg" / "braintumor"


def test_env_puts_wheel_libs_libpython_and_this_python_first(tmp_path):
    install = _fake_install(tmp_path / "site")
    base = {"LD_LIBRARY_PATH": "/opt/x", "PATH": "/usr/bin:/bin", "PYTHONHOME": "/elsewhere", "KEEP": "1"}
    env = te.build_env(install, base)
    assert env["LD_LIBRARY_PATH"].split(":") == [str(install.libs), sysconfig.get_config_var("LIBDIR"), "/opt/x"]
    assert env["PATH"].split(":") == [str(Path(sys.executable).parent), "/usr/bin", "/bin"]
    assert "PYTHONHOME" not in env and env["KEEP"] == "1"
    assert base["PATH"] == "/usr/bin:/bin", "the caller's mapping is not modified"


def test_env_does_not_duplicate_entries(tmp_path):
    install = _fake_install(tmp_path / "site")
    once = te.build_env(install, {"PATH": "/bin"})
    twice = te.build_env(install, once)
    assert twice["PATH"] == once["PATH"] and twice["LD_LIBRARY_PATH"] == once["LD_LIBRARY_PATH"]


def test_find_triton_locates_the_installed_wheel():
    pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed")
    install = te.find_triton()
    assert install.binary.is_file() and install.libs.is_dir()
    assert install.stub().is_file()


def test_find_triton_without_the_wheel_says_what_to_install(monkeypatch):
    monkeypatch.setattr(triton_install.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(te.TritonServerError, match="pip install nvidia-pytriton"):
        te.find_triton()


@pytest.mark.parametrize("version, ok", [("1.26.4", True), ("2.0.0", False), ("2.4.6", False)])
def test_numpy_2_is_refused(monkeypatch, version, ok):
    monkeypatch.setattr(triton_install.importlib.metadata, "version", lambda name: version)
    if ok:
        te.check_numpy()
    else:
        with pytest.raises(te.TritonServerError, match="numpy<2"):
            te.check_numpy()


def test_port_in_use_names_the_option():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ValueError, match=f"grpc port {port} is already in use.*--grpc-port"):
            te.check_ports({"http": te.free_port(), "grpc": port}, host="127.0.0.1")


@pytest.mark.parametrize("ports, message", [
    ({"http": 9000, "grpc": 9000}, "--grpc-port and --http-port are both 9000"),
    ({"http": 0}, "--http-port 0 is not a TCP port"),
    ({"metrics": 70000}, "--metrics-port 70000 is not a TCP port"),
])
def test_bad_ports(ports, message):
    with pytest.raises(ValueError, match=message):
        te.check_ports(ports, host="127.0.0.1")


def test_free_ports_pass_the_check():
    te.check_ports({"http": te.free_port(), "grpc": te.free_port(), "metrics": te.free_port()}, host="127.0.0.1")


def test_repository_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*braintumor export"):
        te.check_repository(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        te.check_repository(tmp_path / "file")
    (tmp_path / "empty" / "not_a_model").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no model"):
        te.check_repository(tmp_path / "empty")
    assert te.check_repository(_model(tmp_path / "repo")) == (tmp_path / "repo").resolve()


def test_start_with_a_missing_repository_fails_before_spawning(tmp_path):
    triton = te.EmbeddedTriton(tmp_path / "nope", te.free_port(), te.free_port(), te.free_port())
    with pytest.raises(FileNotFoundError):
        triton.start()
    assert triton.pid is None and not triton.is_running()
    assert triton.stop() is None  # stopping what never started is a no-op


def test_command_line(tmp_path):
    triton = te.EmbeddedTriton(tmp_path, 8000, 8001, 8002, address="127.0.0.1", log_verbose=1, exit_timeout=3)
    cmd = triton.command(Path("/bin/tritonserver"), Path("/b"), Path("/repo"))
    opts = dict(zip(cmd[1::2], cmd[2::2]))
    assert cmd[0] == "/bin/tritonserver"
    assert opts["--model-repository"] == "/repo" and opts["--backend-directory"] == "/b"
    assert (opts["--http-port"], opts["--grpc-port"], opts["--metrics-port"]) == ("8000", "8001", "8002")
    assert opts["--http-address"] == opts["--grpc-address"] == opts["--metrics-address"] == "127.0.0.1"
    assert opts["--exit-on-error"] == opts["--strict-readiness"] == "true"
    assert opts["--model-control-mode"] == "none" and opts["--exit-timeout-secs"] == "3"
    assert triton.http_url == "127.0.0.1:8000" and triton.metrics_url == "http://127.0.0.1:8002/metrics"
    assert te.EmbeddedTriton(tmp_path, 1, 2, 3, address="10.0.0.5").grpc_url == "10.0.0.5:2"
    assert te.EmbeddedTriton(tmp_path, 1, 2, 3, address="0.0.0.0").grpc_url == "127.0.0.1:2"  # connect over loopback
    assert te.EmbeddedTriton(tmp_path).address == "127.0.0.1"  # Triton authenticates nobody: loopback by default

    # The admin APIs need a header value nobody is given: random per start, never the same twice. Inference, model
    # config and metadata need the instance's client key (random unless given), which only the front doors get.
    def restrictions(triton) -> dict[str, tuple[str, str]]:
        cmd = triton.command(Path("t"), Path("b"), Path("r"))
        http = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--http-restricted-api"]
        grpc = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--grpc-restricted-protocol"]
        assert http == grpc
        found = {}
        for value in http:
            apis, setting = value.split(":")
            header, key = setting.split("=")
            found[header] = (apis, key)
        return found

    admin_keys, client_keys = set(), set()
    for _ in range(2):
        triton = te.EmbeddedTriton(tmp_path)
        found = restrictions(triton)
        assert set(found) == {te.ADMIN_HEADER, te.TRITON_KEY_HEADER}
        admin_apis, admin_key = found[te.ADMIN_HEADER]
        client_apis, client_key = found[te.TRITON_KEY_HEADER]
        assert set(admin_apis.split(",")) == {"model-repository", "shared-memory", "statistics", "trace", "logging"}
        assert set(client_apis.split(",")) == {"inference", "model-config", "metadata"}  # health stays open
        assert len(admin_key) >= 32 and len(client_key) >= 32 and admin_key != client_key
        assert client_key == triton.client_key == restrictions(triton)[te.TRITON_KEY_HEADER][1]  # kept per instance
        admin_keys.add(admin_key)
        client_keys.add(client_key)
    assert len(admin_keys) == len(client_keys) == 2
    assert restrictions(te.EmbeddedTriton(tmp_path, client_key="given"))[te.TRITON_KEY_HEADER][1] == "given"
    assert set(restrictions(te.EmbeddedTriton(tmp_path, restrict_admin=False))) == {te.TRITON_KEY_HEADER}
    assert not restrictions(te.EmbeddedTriton(tmp_path, restrict_admin=False, restrict_clients=False))

    # The python backend's shared-memory regions carry the instance's own prefix (removed after a crash).
    one, two = te.EmbeddedTriton(tmp_path), te.EmbeddedTriton(tmp_path)
    cmd = one.command(Path("t"), Path("b"), Path("r"))
    assert cmd[cmd.index("--backend-config") + 1] == f"python,shm-region-prefix-name={one.shm_prefix}"
    assert one.shm_prefix != two.shm_prefix and one.shm_prefix.startswith("braintumor_")


def test_cleanup_shm_removes_only_this_instances_regions(tmp_path):
    one, two = te.EmbeddedTriton(tmp_path), te.EmbeddedTriton(tmp_path)
    for name in (one.shm_prefix + "a", one.shm_prefix + "b", two.shm_prefix + "a", "triton_python_backend_x"):
        (tmp_path / name).write_bytes(b"x")
    assert sorted(one.cleanup_shm(tmp_path)) == [one.shm_prefix + "a", one.shm_prefix + "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([two.shm_prefix + "a", "triton_python_backend_x"])
    assert one.cleanup_shm(tmp_path / "absent") == []

    explicit = te.EmbeddedTriton(tmp_path, load_models=["a", "b"]).command(Path("t"), Path("b"), Path("r"))
    assert explicit[explicit.index("--model-control-mode") + 1] == "explicit"
    assert [explicit[i + 1] for i, a in enumerate(explicit) if a == "--load-model"] == ["a", "b"]


def test_throughput_layout_picks_each_models_custom_config(tmp_path):
    """--model-config-name=throughput (Triton's configs/<name>.pbtxt); a repository without those files is refused
    by name rather than silently served with config.pbtxt."""
    assert not any(a.startswith("--model-config-name") for a in te.EmbeddedTriton(tmp_path).command(
        Path("t"), Path("b"), Path("r")))
    cmd = te.EmbeddedTriton(tmp_path, layout="throughput").command(Path("t"), Path("b"), Path("r"))
    assert "--model-config-name=throughput" in cmd
    with pytest.raises(ValueError, match="layout"):
        te.EmbeddedTriton(tmp_path, layout="fast")
    for model in ("m", "m_classifier"):
        (tmp_path / model).mkdir()
        (tmp_path / model / "config.pbtxt").write_text("name: 'x'\n")
    (tmp_path / "m" / "configs").mkdir()
    (tmp_path / "m" / "configs" / "throughput.pbtxt").write_text("name: 'x'\n")
    te.check_layout(tmp_path, "latency")
    with pytest.raises(ValueError, match=r"\['m_classifier'\].*configs/throughput.pbtxt.*re-export"):
        te.check_layout(tmp_path, "throughput")
    (tmp_path / "m_classifier" / "configs").mkdir()
    (tmp_path / "m_classifier" / "configs" / "throughput.pbtxt").write_text("name: 'x'\n")
    te.check_layout(tmp_path, "throughput")


def test_cli_options_and_defaults(tmp_path):
    args = build_parser().parse_args(["triton", "--model-repository", str(tmp_path)])
    assert (args.http_port, args.grpc_port, args.metrics_port) == (8000, 8001, 8002)
    assert args.model_repository == tmp_path
    args = build_parser().parse_args(["triton", "--model-repository", str(tmp_path), "--http-port", "9000"])
    assert args.http_port == 9000
    for command in (["triton", "--model-repository", str(tmp_path)], ["serve"]):
        assert build_parser().parse_args(command).layout == "latency"
        assert build_parser().parse_args([*command, "--layout", "throughput"]).layout == "throughput"
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--layout", "fast"])


def test_serve_refuses_a_layout_for_an_external_triton(capsys):
    """The layout picks the embedded Triton's configs: with --triton-url it is refused before anything starts, with
    the flag to give that Triton instead."""
    from braintumor.serving.cli import main

    assert main(["serve", "--layout", "throughput", "--triton-url", "127.0.0.1:1", "--http-port", str(te.free_port()),
                 "--grpc-port", str(te.free_port()), "--grpc-metrics-port", str(te.free_port())]) == 2
    assert "--model-config-name=throughput" in capsys.readouterr().err


def test_cli_missing_repository_is_one_line_error(tmp_path, capsys):
    from braintumor.serving.cli import main

    assert main(["triton", "--model-repository", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("braintumor triton: error: model repository") and "Traceback" not in err


# -- lifecycle against a fake tritonserver: a script that serves /v2/health/ready and forks a "stub" child -----------
FAKE_SERVER = '''#!{python}
import argparse, http.server, os, signal, subprocess, sys, time
p = argparse.ArgumentParser()
p.add_argument("--http-port", type=int)
p.add_argument("--mode", default="ok")
args, _ = p.parse_known_args()
print("fake tritonserver starting", flush=True)
if args.mode == "fail":
    print("error: creating server: Internal - failed to load all models", flush=True)
    sys.exit(1)
# a child that ignores SIGTERM, like a python stub that is slow to go: only SIGKILL of the group ends it
stub = subprocess.Popen([sys.executable, "-c",
                         "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)",
                         "fake_stub_marker"])
if args.mode == "never_ready":
    time.sleep(600)

class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/v2/health/ready" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass

server = http.server.HTTPServer(("127.0.0.1", args.http_port), Ready)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))  # exits, leaving the stub behind
server.serve_forever()
'''


@pytest.fixture
def fake_triton(tmp_path, monkeypatch):
    install = _fake_install(tmp_path / "site")
    install.binary.write_text(FAKE_SERVER.format(python=sys.executable))
    install.binary.chmod(0o755)
    monkeypatch.setattr(te, "find_triton", lambda: install)
    monkeypatch.setattr(te, "check_numpy", lambda: None)
    repo = _model(tmp_path / "repo")

    def make(mode="ok", **kwargs):
        return te.EmbeddedTriton(repo, te.free_port(), te.free_port(), te.free_port(), address="127.0.0.1",
                                 cache_dir=tmp_path / "cache", extra_args=["--mode", mode], **kwargs)

    return make


def _alive(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
    except (OSError, StopIteration):
        return False
    return "zombie" not in state


def _group_members(pgid: int) -> list[int]:
    members = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and _alive(int(proc.name)):
                members.append(int(proc.name))
    return members


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stop_kills_the_whole_process_group(fake_triton):
    with fake_triton() as triton:
        assert triton.is_running()
        pgid = triton.pid
        deadline = time.monotonic() + 5
        while len(_group_members(pgid)) < 2 and time.monotonic() < deadline:  # the fake stub is up
            time.sleep(0.05)
        assert len(_group_members(pgid)) >= 2
        assert "fake tritonserver starting" in triton.log_tail()
    assert not triton.is_running()
    deadline = time.monotonic() + 5
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _group_members(pgid) == [], "a stub outlived stop()"


def test_early_exit_raises_with_the_log_tail(fake_triton):
    triton = fake_triton("fail")
    with pytest.raises(te.TritonServerError, match=r"exited with code 1(.|\n)*failed to load all models"):
        triton.start()
    assert not triton.is_running()


def test_not_ready_in_time_raises_and_stops(fake_triton):
    triton = fake_triton("never_ready", startup_timeout=1.0)
    with pytest.raises(te.TritonServerError, match=r"not ready after 1 s"):
        triton.start()
    assert not triton.is_running()


def test_echo_streams_the_server_log(fake_triton):
    import io

    stream = io.StringIO()
    with fake_triton(echo=stream):
        pass
    assert "fake tritonserver starting" in stream.getvalue()


def test_abort_start_ends_the_wait_for_readiness(fake_triton):
    """What `braintumor serve` calls from its signal handler while Triton is still starting."""
    import threading

    triton = fake_triton("never_ready", startup_timeout=60)
    threading.Timer(0.5, triton.abort_start).start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt, match="stopped while tritonserver was starting"):
            triton.start()
        assert time.monotonic() - started < 10
    finally:
        triton.stop()
    assert not triton.is_running()


def test_free_port_is_below_the_ephemeral_range_and_bindable():
    """Outgoing connections take their local port from the ephemeral range; a port under it cannot be taken by one
    between free_port() and the server binding it."""
    import socket

    from braintumor.serving.triton_checks import _ephemeral_low, free_port

    ports = {free_port() for _ in range(20)}
    assert all(20000 <= p < _ephemeral_low() for p in ports) and len(ports) > 1
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports.pop()))


def test_free_port_does_not_follow_the_global_random_seed():
    """Training seeds Python's global generator; two processes that both trained drew the same 'free' port and their
    servers collided. The draw has its own generator."""
    import random

    from braintumor.serving.triton_checks import free_port

    draws = []
    for _ in range(4):
        random.seed(0)
        draws.append(free_port())
    assert len(set(draws)) > 1, draws


def test_a_taken_port_is_named_by_the_callers_option(tmp_path):
    """`serve` names its own ports --http-port / --grpc-metrics-port and Triton's --triton-http-port (a taken port was
    reported as '--gRPC metrics-port')."""
    import subprocess

    repo = tmp_path / "repo" / "m"
    repo.mkdir(parents=True)
    (repo / "config.pbtxt").write_text('name: "m"')
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        free = [str(te.free_port()) for _ in range(6)]
        for flag, index in (("--grpc-metrics-port", 2), ("--triton-http-port", 3)):
            ports = dict(zip(["--http-port", "--grpc-port", "--grpc-metrics-port", "--triton-http-port",
                              "--triton-grpc-port", "--triton-metrics-port"], free))
            ports[flag] = port
            done = subprocess.run([sys.executable, "-m", "braintumor.serving.cli", "serve", "--model-repository",
                                   str(tmp_path / "repo"), *[x for kv in ports.items() for x in kv]],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode != 0 and f"choose another with {flag}" in done.stderr, (flag, done.stderr[-500:])

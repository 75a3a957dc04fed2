"""The embedded Triton: runs the real ``tritonserver`` binary from the nvidia-pytriton wheel on a model repository.

Owns finding the binary, assembling a python-backend directory with the stub for this interpreter, the process
environment, readiness, and a clean stop of the whole process group (server and python stubs).
"""

from __future__ import annotations

import collections
import importlib.metadata
import importlib.util
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Mapping, Sequence

from ..export.contract import CONFIG_FILE, CONFIGS_DIR, LAYOUTS
from .settings import TRITON_KEY_HEADER
from .supervisor import dead_children, die_with_parent, http_ready, stop_group

logger = logging.getLogger(__name__)

WHEEL = "nvidia-pytriton"
STUB_NAME = "triton_python_backend_stub"
BACKEND_LIB = "libtriton_python.so"
BACKEND_UTILS = "triton_python_backend_utils.py"
CACHE_ENV = "BRAINTUMOR_CACHE"  # where the assembled backend directory is kept (default ~/.cache/braintumor)
# Triton's admin APIs (change the log level, register shared memory, load models, trace, per-model statistics) need a
# header whose value is a random secret made per start and given to no client, so nobody can use them.
ADMIN_APIS = ("model-repository", "shared-memory", "statistics", "trace", "logging")
ADMIN_HEADER = "braintumor-admin-key"
# Inference, model config (it discloses temperature, thresholds, preprocessing) and metadata need TRITON_KEY_HEADER
# with the instance's client key, which only our front doors get (through their environment, never argv); health
# stays open for readiness probes. Another local process without the key is refused.
CLIENT_APIS = ("inference", "model-config", "metadata")
STARTUP_REPORT_S = 15.0  # while Triton loads the models, say so this often (a start is never silent for minutes)


class TritonServerError(RuntimeError):
    """tritonserver cannot run here, exited early, was not ready in time, or died; the message says why (with the
    server's last log lines when it ran)."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of tritonserver sit inside the installed nvidia-pytriton wheel."""

    version: str
    root: Path  # .../site-packages/pytriton/tritonserver

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    @property
    def stubs(self) -> Path:
        return self.root / "python_backend_stubs"

    @property
    def libs(self) -> Path:
        # auditwheel's folder of vendored shared libraries, next to the package in site-packages
        return self.root.parent.parent / "nvidia_pytriton.libs"

    def stub(self, python: tuple[int, int] = sys.version_info[:2]) -> Path:
        path = self.stubs / f"{python[0]}.{python[1]}" / STUB_NAME
        if not path.is_file():
            have = sorted(p.name for p in self.stubs.iterdir() if (p / STUB_NAME).is_file()) if self.stubs.is_dir() else []
            raise TritonServerError(f"{WHEEL} {self.version} has no python backend stub for Python "
                                   f"{python[0]}.{python[1]} (it has {', '.join(have) or 'none'}); "
                                   "run braintumor under one of those Python versions")
        return path


def find_triton() -> TritonInstall:
    """Locate tritonserver in the installed nvidia-pytriton wheel, without importing pytriton (it is heavy)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(f"tritonserver comes from the {WHEEL} wheel, which is not installed: "
                               f"pip install {WHEEL} (Linux x86_64, Python 3.8-3.13)")
    install = TritonInstall(importlib.metadata.version(WHEEL), Path(list(spec.submodule_search_locations)[0]) / "tritonserver")
    for path in (install.binary, install.python_backend / BACKEND_LIB, install.libs):
        if not path.exists():
            raise TritonServerError(f"{path} is missing: the {WHEEL} {install.version} install is incomplete or "
                                   f"its layout changed; reinstall it (pip install --force-reinstall {WHEEL})")
    return install


def check_numpy() -> None:
    """The wheel's python stub is built against numpy 1.x; under numpy 2 ``as_numpy()`` reads wrong data silently
    (checked: an FP32 input [1, 2, 3] arrived as [1, 1, 1]). Refuse to start rather than serve wrong answers."""
    try:
        version = importlib.metadata.version("numpy")
    except importlib.metadata.PackageNotFoundError:
        raise TritonServerError("numpy is not installed; the python backend needs numpy<2") from None
    if int(version.split(".")[0]) >= 2:
        raise TritonServerError(f"numpy {version} is installed, but the python backend stub of {WHEEL} is built "
                               "for numpy 1.x and corrupts tensors under numpy 2: pip install 'numpy<2'")


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "braintumor"


def assemble_backend_dir(install: TritonInstall, cache_dir: Path | None = None,
                         python: tuple[int, int] = sys.version_info[:2]) -> Path:
    """A ``--backend-directory`` holding ``python/`` = the wheel's python backend + the stub for ``python``.

    The wheel keeps the stubs apart from the backend; Triton looks for the stub next to libtriton_python.so.
    Built once per wheel version and Python version, atomically (a rename), so concurrent starts are safe.
    """
    stub = install.stub(python)
    root = (cache_dir or default_cache_dir()) / "triton-backends" / f"{WHEEL}-{install.version}-py{python[0]}.{python[1]}"
    sources = {BACKEND_LIB: install.python_backend / BACKEND_LIB,
               BACKEND_UTILS: install.python_backend / BACKEND_UTILS,
               STUB_NAME: stub}
    target = root / "python"
    if target.is_dir() and all((target / n).is_file() and (target / n).stat().st_size == s.stat().st_size
                               for n, s in sources.items()):
        return root
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".python-", dir=root))
    try:
        for name, source in sources.items():
            shutil.copy2(source, staging / name)
        (staging / STUB_NAME).chmod(0o755)
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except FileExistsError:  # another process won the race; its copy is identical
        pass
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root


def build_env(install: TritonInstall, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of tritonserver and its python stubs.

    - LD_LIBRARY_PATH: the wheel's vendored libraries, then this interpreter's libpython directory; without the
      latter the stub may load the system's libpython of the same name and die in ``threading``
      (``'_thread.RLock' object has no attribute '_recursion_count'``).
    - PATH: this interpreter's bin directory first. The stub embeds Python and ignores PYTHONPATH; it finds
      ``python3`` on PATH to set ``sys.executable``, so a venv's python there gives the stub the venv's
      site-packages (numpy, onnxruntime, an editable braintumor) through its pyvenv.cfg.
    """
    env = dict(os.environ if base is None else base)

    def prepend(key: str, *paths: str) -> None:
        parts = [p for p in paths if p] + [p for p in env.get(key, "").split(os.pathsep) if p and p not in paths]
        env[key] = os.pathsep.join(parts)

    prepend("LD_LIBRARY_PATH", str(install.libs), sysconfig.get_config_var("LIBDIR") or "")
    prepend("PATH", str(Path(sys.executable).parent))
    env.pop("PYTHONHOME", None)  # would point the embedded interpreter at another installation
    return env


def check_ports(ports: Mapping[str, int], host: str = "0.0.0.0") -> None:
    """Fail early, naming the option to change, when a port is taken or two services share one."""
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"--{name}-port {port} is not a TCP port (1-65535)")
        if port in seen:
            raise ValueError(f"--{name}-port and --{seen[port]}-port are both {port}; give each service its own port")
        seen[port] = name
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise ValueError(f"{name} port {port} is already in use ({exc.strerror}); stop what holds it or "
                                 f"choose another with --{name}-port") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for tests and benchmarks, drawn BELOW the kernel's ephemeral range when it can be.

    Binding to port 0 returns an ephemeral port, the same pool every outgoing connection takes its local port
    from: between this call and the server binding it, a client connection elsewhere on the host can take it
    (seen as "Address already in use" in the e2e suite). Ports under the range are never handed out that way.
    """
    low = _ephemeral_low()
    for port in random.sample(range(20000, low), min(64, max(0, low - 20000))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ephemeral_low(default: int = 32768) -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def check_repository(path: str | os.PathLike) -> Path:
    """The repository must exist and hold at least one ``<model>/config.pbtxt`` (the python backend needs one)."""
    repo = Path(path).expanduser().resolve()
    if not repo.exists():
        raise FileNotFoundError(f"model repository {repo} does not exist; create it with "
                                "`braintumor export --checkpoint CKPT --out DIR`")
    if not repo.is_dir():
        raise NotADirectoryError(f"model repository {repo} is not a directory")
    models = sorted(p.parent.name for p in repo.glob(f"*/{CONFIG_FILE}"))
    if not models:
        raise ValueError(f"model repository {repo} holds no model (expected {repo}/<model>/{CONFIG_FILE}); "
                         "create one with `braintumor export`")
    return repo


def check_layout(repo: Path, layout: str) -> None:
    """Every model of ``repo`` has the layout's config (Triton would quietly fall back to config.pbtxt otherwise)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if layout == "latency":
        return
    missing = sorted(p.parent.name for p in repo.glob(f"*/{CONFIG_FILE}")
                     if not (p.parent / CONFIGS_DIR / f"{layout}.pbtxt").is_file())
    if missing:
        raise ValueError(f"models {missing} in {repo} have no {CONFIGS_DIR}/{layout}.pbtxt (exported before layouts); "
                         "re-export them with `braintumor export`, or serve the latency layout")


class EmbeddedTriton:
    """tritonserver as a child process group; a context manager that starts it, waits for readiness and stops it::

        with EmbeddedTriton("model_repository", http_port=8000, grpc_port=8001, metrics_port=8002) as triton:
            client = tritonclient.grpc.InferenceServerClient(triton.grpc_url)  # "127.0.0.1:8001"
    """

    def __init__(self, model_repository: str | os.PathLike, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, *, address: str = "127.0.0.1", load_models: Sequence[str] | None = None,
                 log_verbose: int = 0, startup_timeout: float = 120.0, exit_timeout: int = 5,
                 echo: IO[str] | None = None, cache_dir: Path | None = None,
                 extra_args: Sequence[str] = (), restrict_admin: bool = True, layout: str = "latency",
                 client_key: str | None = None, restrict_clients: bool = True) -> None:
        """``address``: Triton authenticates nobody, so the default is loopback. ``restrict_admin``: lock
        :data:`ADMIN_APIS` behind a per-start random key nobody is given.
        ``load_models``: only these (``--model-control-mode explicit``); default all in the repository.
        ``echo``: a stream that receives the server's log lines as they come (the CLI passes stderr).
        ``exit_timeout``: on stop, seconds Triton waits for in-flight requests and open client connections (idle
        keep-alive ones included: close clients first for a fast stop) before it exits anyway with code 1.
        ``client_key``: the value of TRITON_KEY_HEADER that inference, model config and metadata need
        (:data:`CLIENT_APIS`); default a random one made once per instance (a restart keeps it, so the front doors'
        copy stays valid), read back as :attr:`client_key`. ``restrict_clients=False`` leaves them open (tests of an
        open Triton only).
        ``layout``: ``latency`` (config.pbtxt) or ``throughput`` (each model's configs/throughput.pbtxt, Triton's
        ``--model-config-name``; see export/triton_config.layout_options)."""
        self.model_repository = Path(model_repository)
        self.ports = {"http": int(http_port), "grpc": int(grpc_port), "metrics": int(metrics_port)}
        self.address = address
        self.load_models = list(load_models) if load_models else None
        self.log_verbose = int(log_verbose)
        self.startup_timeout = float(startup_timeout)
        self.exit_timeout = int(exit_timeout)
        self.echo = echo
        self.cache_dir = cache_dir
        self.extra_args = list(extra_args)
        self.restrict_admin = bool(restrict_admin)
        self.client_key = (client_key or secrets.token_urlsafe(32)) if restrict_clients else None
        # The python backend's shared-memory regions (/dev/shm) carry this instance's own prefix, so whatever a
        # killed server left there can be told from other servers' and removed before a restart (cleanup_shm).
        self.shm_prefix = f"braintumor_{os.getpid()}_{secrets.token_hex(4)}_"
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        self.layout = layout
        self._process: subprocess.Popen[str] | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=400)
        self._pump: threading.Thread | None = None
        self._abort = threading.Event()  # set by serve_forever's signal handler: give up waiting for readiness

    # -- addresses (where a client on this host connects) ---------------------------------------------------------
    @property
    def host(self) -> str:
        return "127.0.0.1" if self.address in ("0.0.0.0", "localhost", "") else self.address

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports['metrics']}/metrics"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self._log)[-lines:])

    # -- lifecycle -------------------------------------------------------------------------------------------
    def command(self, binary: Path, backend_dir: Path, repository: Path) -> list[str]:
        cmd = [str(binary), "--model-repository", str(repository), "--backend-directory", str(backend_dir),
               "--http-port", str(self.ports["http"]), "--grpc-port", str(self.ports["grpc"]),
               "--metrics-port", str(self.ports["metrics"]),
               "--http-address", self.address, "--grpc-address", self.address, "--metrics-address", self.address,
               # a model that fails to load stops the server instead of leaving it "up" without the model
               "--exit-on-error", "true", "--strict-readiness", "true",
               "--exit-timeout-secs", str(self.exit_timeout), "--log-verbose", str(self.log_verbose),
               "--allow-cpu-metrics", "true",
               "--backend-config", f"python,shm-region-prefix-name={self.shm_prefix}"]
        if self.restrict_admin:
            # In argv, so a local user who can list processes could read it; the APIs are on loopback as well.
            restricted = f"{','.join(ADMIN_APIS)}:{ADMIN_HEADER}={secrets.token_urlsafe(32)}"
            cmd += ["--http-restricted-api", restricted, "--grpc-restricted-protocol", restricted]
        if self.client_key:
            # argv is readable by local users through /proc unless it is mounted hidepid=2 (README, Security)
            clients = f"{','.join(CLIENT_APIS)}:{TRITON_KEY_HEADER}={self.client_key}"
            cmd += ["--http-restricted-api", clients, "--grpc-restricted-protocol", clients]
        if self.layout != "latency":
            cmd.append(f"--model-config-name={self.layout}")
        if self.load_models:
            cmd += ["--model-control-mode", "explicit"]
            for name in self.load_models:
                cmd += ["--load-model", name]
        else:
            cmd += ["--model-control-mode", "none"]
        return cmd + self.extra_args

    def start(self) -> EmbeddedTriton:
        """Start tritonserver and block until ``/v2/health/ready`` (every model loaded) or raise TritonServerError."""
        if self.is_running():
            return self
        repository = check_repository(self.model_repository)
        check_layout(repository, self.layout)
        check_ports(self.ports, self.address)
        check_numpy()
        install = find_triton()
        backend_dir = assemble_backend_dir(install, self.cache_dir)
        cmd = self.command(install.binary, backend_dir, repository)
        self.cleanup_shm()  # a previous run of this instance that was killed
        logger.debug("starting %s", " ".join(cmd))
        self._log.clear()
        self._process = subprocess.Popen(
            cmd, env=build_env(install), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
            start_new_session=True,  # its own process group: stopping it reaches the python stubs too
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)
        self._pump = threading.Thread(target=self._read_log, name="tritonserver-log", daemon=True)
        self._pump.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        logger.info("tritonserver (%s %s) ready on %s, listening on %s: HTTP :%d, gRPC :%d, metrics :%d/metrics "
                    "(pid %d)", WHEEL, install.version, repository, self.address, self.ports["http"],
                    self.ports["grpc"], self.ports["metrics"], self._process.pid)
        return self

    def _read_log(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            line = line.rstrip("\n")
            self._log.append(line)
            if self.echo is not None:
                print(line, file=self.echo, flush=True)

    def _wait_ready(self) -> None:
        assert self._process is not None
        url = f"http://{self.http_url}/v2/health/ready"
        start = time.monotonic()
        deadline, report = start + self.startup_timeout, start + STARTUP_REPORT_S
        while True:
            code = self._process.poll()
            if code is not None:
                if self._pump:
                    self._pump.join(timeout=2)  # let the last lines in
                raise TritonServerError(f"tritonserver exited with code {code} before it was ready; "
                                       f"last log lines:\n{self.log_tail()}")
            if http_ready(url, timeout=1.0):
                return
            dead = dead_children(self._process.pid)
            if dead:
                # A python stub that dies at start (a missing libpython, a crash in the backend) leaves Triton
                # waiting for it for minutes without a word; its own error is in the log by now.
                time.sleep(0.5)  # let its last lines in
                names = ", ".join(f"{comm} (pid {pid})" for pid, comm in dead)
                raise TritonServerError(f"a process tritonserver started died while the models were loading: "
                                       f"{names}; last log lines:\n{self.log_tail()}")
            if self._abort.is_set():
                raise KeyboardInterrupt("stopped while tritonserver was starting")
            now = time.monotonic()
            if now > deadline:
                raise TritonServerError(f"tritonserver was not ready after {self.startup_timeout:.0f} s "
                                       f"({url}); last log lines:\n{self.log_tail()}")
            if now > report:
                last = self.log_tail(1) or "(nothing logged yet)"
                logger.info("still waiting for tritonserver to load the models (%.0f s); its last log line: %s",
                            now - start, last)
                report = now + STARTUP_REPORT_S
            time.sleep(0.2)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM the process group, wait, then SIGKILL what is left; returns tritonserver's exit code."""
        process, self._process = self._process, None
        if process is None:
            return None
        timeout = self.exit_timeout + 5.0 if timeout is None else timeout
        # the stubs normally exit with the server; anything left in its group must not outlive it
        code = stop_group(process, timeout, "tritonserver")
        if self._pump:
            self._pump.join(timeout=2)
        if process.stdout:
            process.stdout.close()
        self.cleanup_shm()  # a server killed with SIGKILL (or OOM) never removed its python-backend regions
        logger.info("Triton stopped (exit code %s)", code)
        return code

    def cleanup_shm(self, root: Path = Path("/dev/shm")) -> list[str]:
        """Remove the shared-memory regions this instance's servers made (:attr:`shm_prefix`); call only while no
        server of this instance runs. Returns the names removed."""
        removed = []
        for region in root.glob(f"{self.shm_prefix}*") if root.is_dir() else ():
            try:
                region.unlink()
                removed.append(region.name)
            except FileNotFoundError:
                continue
        if removed:
            logger.info("removed %d shared-memory region(s) a stopped tritonserver left in %s", len(removed), root)
        return removed

    def abort_start(self) -> None:
        """Stop waiting for readiness: a :meth:`start` in progress raises KeyboardInterrupt and leaves the process to
        :meth:`stop`. Safe from a signal handler (it only sets an event)."""
        self._abort.set()

    def wait(self) -> int:
        """Block until tritonserver exits (it was stopped, or it failed); its exit code."""
        if self._process is None:
            raise RuntimeError("EmbeddedTriton.wait() before start()")
        return self._process.wait()

    def serve_forever(self) -> int:
        """Start, then run until SIGINT/SIGTERM (main thread) or until the server dies; stop cleanly either way."""
        received: list[int] = []
        self._abort.clear()

        def on_signal(signum: int, _frame: object) -> None:
            received.append(signum)
            self.abort_start()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            while self.is_running() and not received:
                time.sleep(0.2)
            if received:
                logger.info("%s received; stopping Triton", signal.Signals(received[0]).name)
                self.stop()
                return 0
            code = self.wait()
            raise TritonServerError(f"tritonserver died with code {code}; "
                                   f"last log lines:\n{self.log_tail()}")
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def __enter__(self) -> EmbeddedTriton:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort; callers should stop() or use `with`
        if getattr(self, "_process", None) is not None:
            try:
                self.stop(timeout=5)
            except Exception:  # noqa: BLE001 - interpreter shutdown: modules may already be gone
                logger.debug("stopping Triton from __del__ failed", exc_info=True)

"""The embedded Triton: runs the real ``tritonserver`` binary from the nvidia-pytriton wheel on a model repository.

Owns the server's command line (restricted APIs, shared-memory prefix), readiness (a stub that dies at start ends
it with its error), and a clean stop of the whole process group (server and python stubs) with what it left in
/dev/shm. Where the binary comes from is :mod:`.triton_install`; the checks before a start, :mod:`.triton_checks`.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Sequence

from ..export.contract import LAYOUTS
from .settings import TRITON_KEY_HEADER
from .supervisor import dead_children, die_with_parent, http_ready, stop_group
from .triton_checks import check_layout, check_ports, check_repository, free_port
from .triton_install import (
    BACKEND_LIB, BACKEND_UTILS, CACHE_ENV, STUB_NAME, WHEEL, TritonInstall, TritonServerError, assemble_backend_dir,
    build_env, check_numpy, default_cache_dir, find_triton,
)

# What callers know this module by: the server, its error, and the install and check helpers it starts with.
__all__ = ["ADMIN_APIS", "ADMIN_HEADER", "BACKEND_LIB", "BACKEND_UTILS", "CACHE_ENV", "CLIENT_APIS", "STUB_NAME",
           "WHEEL", "EmbeddedTriton", "TritonInstall", "TritonServerError", "assemble_backend_dir", "build_env",
           "check_layout", "check_numpy", "check_ports", "check_repository", "default_cache_dir", "find_triton",
           "free_port"]

logger = logging.getLogger(__name__)

# Triton's admin APIs (change the log level, register shared memory, load models, trace, per-model statistics) need a
# header whose value is a random secret made per start and given to no client, so nobody can use them.
ADMIN_APIS = ("model-repository", "shared-memory", "statistics", "trace", "logging")
ADMIN_HEADER = "braintumor-admin-key"
# Inference, model config (it discloses temperature, thresholds, preprocessing) and metadata need TRITON_KEY_HEADER
# with the instance's client key, which only our front doors get (through their environment, never argv); health
# stays open for readiness probes. Another local process without the key is refused.
CLIENT_APIS = ("inference", "model-config", "metadata")
# A python stub dead and unreaped this long during start-up ends the start: not a passing exit, and long enough for a
# tritonserver that stops by itself (a model that fails to load, --exit-on-error) to report its own reason first.
STUB_DEAD_S = 5.0
STARTUP_REPORT_S = 15.0  # while Triton loads the models, say so this often (a start is never silent for minutes)


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
                 client_key: str | None = None, restrict_clients: bool = True, option_prefix: str = "") -> None:
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
        ``option_prefix``: how the caller's command line names the ports, for errors (``--<prefix>http-port``).
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
        self.option_prefix = option_prefix
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
        check_ports(self.ports, self.address,
                    options={name: f"--{self.option_prefix}{name}-port" for name in self.ports})
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
        dead_since: dict[int, float] = {}  # pid -> when a stub was first seen dead and unreaped
        while True:
            code = self._process.poll()
            if code is not None:
                if self._pump:
                    self._pump.join(timeout=2)  # let the last lines in
                raise TritonServerError(f"tritonserver exited with code {code} before it was ready; "
                                       f"last log lines:\n{self.log_tail()}")
            if http_ready(url, timeout=1.0):
                return
            # A python stub that dies at start (a missing libpython, a crash in the backend) leaves Triton waiting
            # for it for minutes without a word. Only a stub that stays dead and unreaped counts: any child Triton
            # reaps within STUB_DEAD_S (a helper it ran and collected) is its own business.
            now = time.monotonic()
            dead_since = {pid: dead_since.get(pid, now) for pid, comm in dead_children(self._process.pid)
                          if comm.startswith(STUB_NAME[:15])}  # /proc's command name is cut at 15 characters
            dead = sorted(pid for pid, since in dead_since.items() if now - since >= STUB_DEAD_S)
            if dead:
                raise TritonServerError(f"a python backend stub tritonserver started died while the models were "
                                       f"loading (pid {', '.join(map(str, dead))}); last log lines:\n"
                                       f"{self.log_tail()}")
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

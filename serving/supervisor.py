"""Child processes of `braintumor serve`: each in its own process group, waited for, and stopped with everything it
started (BentoML's workers, Triton's python stubs), so Ctrl-C or SIGTERM leaves no orphans."""

from __future__ import annotations

import ctypes  # at import time: nothing should be imported in the child between fork and exec
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence

logger = logging.getLogger("braintumor.serve")


class ChildProcess:
    def __init__(self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.env = dict(env) if env is not None else None
        self.process: subprocess.Popen | None = None

    def start(self) -> ChildProcess:
        self.process = subprocess.Popen(self.cmd, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)
        return self

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the group (graceful), then SIGKILL what is left after ``timeout`` seconds."""
        process, self.process = self.process, None
        return None if process is None else stop_group(process, timeout, self.name)


def stop_group(process: subprocess.Popen, timeout: float, name: str) -> int:
    """Stop a process started with ``start_new_session=True`` and everything in its group: SIGTERM, up to
    ``timeout`` seconds, then SIGKILL; finally SIGKILL whatever it left in the group (workers, stubs)."""
    signal_group(process.pid, signal.SIGTERM)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        logger.warning("%s did not stop within %.0f s; killing it", name, timeout)
        signal_group(process.pid, signal.SIGKILL)
        code = process.wait()
    signal_group(process.pid, signal.SIGKILL)
    return code


def wait_until(check: Callable[[], bool], timeout: float, children: Sequence[ChildProcess],
               what: str, interval: float = 0.25, abort: Callable[[], bool] = lambda: False) -> None:
    """Poll ``check`` until true; RuntimeError if a child dies or ``timeout`` passes, KeyboardInterrupt on abort."""
    deadline = time.monotonic() + timeout
    while not check():
        for child in children:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited with code {child.exit_code()} while waiting for {what}")
        if abort():
            raise KeyboardInterrupt(f"stopped while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready after {timeout:.0f} s")
        time.sleep(interval)


def http_ready(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def grpc_serving(target: str, timeout: float = 2.0) -> bool:
    """The standard gRPC health check of the whole server says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=timeout)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def signal_group(pgid: int, sig: int) -> None:
    """``killpg`` that ignores a group already gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux ``preexec_fn``: SIGTERM the child if the process that started it dies, even by SIGKILL (no orphans)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # no glibc here (musl): the parent's stop() / process-group kill still applies
        return
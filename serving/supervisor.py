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
from collections.abc import Callable, Collection, Mapping, Sequence

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


class Backoff:
    """Seconds to wait before restarting a component that died: ``first``, doubling up to ``cap``; back to ``first``
    once the component has run ``stable`` seconds since its last start (a crash a day is not a crash loop)."""

    def __init__(self, first: float = 1.0, cap: float = 30.0, stable: float = 60.0) -> None:
        self.first, self.cap, self.stable = first, cap, stable
        self._next = first
        self._started: float | None = None

    def started(self, now: float) -> None:
        self._started = now

    def failed(self, now: float) -> float:
        if self._started is not None and now - self._started >= self.stable:
            self._next = self.first
        delay, self._next = self._next, min(self.cap, self._next * 2)
        return delay


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


def become_subreaper() -> bool:
    """Linux: adopt the orphans of our descendants instead of letting init have them. BentoML starts its workers in
    their own sessions, so a SIGKILLed `bentoml serve` leaves them holding its port, out of reach of a process-group
    stop; as a subreaper, `serve` finds them among its own children (:func:`stop_orphans`)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except OSError:
        return False


def stop_orphans(keep: Collection[int], timeout: float = 5.0) -> list[int]:
    """SIGTERM, then after ``timeout`` s SIGKILL, every child of this process whose pid is not in ``keep`` (orphans
    adopted as a subreaper), and reap them. Returns their pids."""
    me = os.getpid()
    orphans = [pid for pid, ppid in _parents().items() if ppid == me and pid not in keep]
    for pid in orphans:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    left = list(orphans)
    while left:
        left = [pid for pid in left if not _reaped(pid)]
        if left and time.monotonic() > deadline:
            for pid in left:
                _signal(pid, signal.SIGKILL)
            deadline = float("inf")
        if left:
            time.sleep(0.05)
    if orphans:
        logger.warning("stopped %d orphaned process(es) %s", len(orphans), orphans)
    return orphans


def _processes() -> dict[int, tuple[str, str, int]]:
    """pid -> (command name, state letter, parent pid) of every process /proc shows (Linux; empty elsewhere)."""
    table = {}
    names = os.listdir("/proc") if os.path.isdir("/proc") else []
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    head, tail = fh.read().rsplit(")", 1)
                fields = tail.split()
                table[int(name)] = (head.split("(", 1)[1], fields[0], int(fields[1]))
            except (OSError, IndexError, ValueError):
                continue
    return table


def _parents() -> dict[int, int]:
    return {pid: ppid for pid, (_, _, ppid) in _processes().items()}


def dead_children(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of ``pid``'s children that have exited and were not reaped (zombies): a server that has
    not noticed a helper of its own died (Triton's python stubs, for one)."""
    return [(child, comm) for child, (comm, state, ppid) in _processes().items() if ppid == pid and state == "Z"]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:  # not ours (anymore) or already reaped
        return True


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux ``preexec_fn``: SIGTERM the child if the process that started it dies, even by SIGKILL (no orphans)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # no glibc here (musl): the parent's stop() / process-group kill still applies
        return
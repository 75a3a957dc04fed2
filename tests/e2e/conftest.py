"""e2e fixtures: `braintumor serve` as a real subprocess group (Triton + gateway + gRPC), started once per session on
the tiny model, plus a factory for tests that need their own (fault drills)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest


@dataclass
class Served:
    """A running `braintumor serve`: its process, ports and captured output."""

    proc: subprocess.Popen
    ports: dict[str, int]
    lines: list[str] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start_serve(*extra: str, env: dict | None = None, timeout: float = 240) -> Served:
    from braintumor.serving.triton_embedded import free_port

    ports = {name: free_port() for name in ("http", "grpc", "grpc_metrics")}
    cmd = [sys.executable, "-m", "braintumor.serving.cli", "serve", "--host", "127.0.0.1",
           "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
           "--grpc-metrics-port", str(ports["grpc_metrics"]), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    served = Served(proc, ports)

    def pump():
        for line in proc.stdout:
            served.lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not any("braintumor is ready" in line for line in served.lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            time.sleep(0.5)  # let the pump read the last lines
            pytest.fail("braintumor serve did not become ready:\n" + "".join(served.lines[-60:]))
        time.sleep(0.2)
    return served


@pytest.fixture(scope="session")
def served(tiny_repository):
    """One `braintumor serve` on the tiny model with its own Triton ports, shared by the serve, SDK, score and loadtest
    e2e tests. At the end it must stop on SIGTERM with exit code 0 and leave no process behind (an error at the
    teardown of the last test that used it)."""
    from braintumor.serving.triton_embedded import free_port

    instance = start_serve("--model-repository", str(tiny_repository),
                           "--triton-http-port", str(free_port()), "--triton-grpc-port", str(free_port()),
                           "--triton-metrics-port", str(free_port()))
    tree = ProcessTree()
    try:
        yield instance
    finally:
        children = tree.descendants(instance.proc.pid)
        code = instance.stop()
    assert code == 0, "".join(instance.lines[-40:])
    # the SIGKILL of the group in stop() does not reach the children: each runs in its own process group
    assert not tree.alive(children), "processes outlived `braintumor serve`"


@pytest.fixture
def serve_factory():
    """Start `braintumor serve` with the given flags; every instance is stopped (and its group killed) afterwards."""
    started: list[Served] = []

    def factory(*extra: str, env: dict | None = None) -> Served:
        started.append(start_serve(*extra, env=env))
        return started[-1]

    yield factory
    for instance in started:
        instance.stop()


class Load:
    """HTTP and gRPC Analyze calls in a loop, every outcome counted, with the slowest answer of each outcome."""

    def __init__(self, served, image: bytes) -> None:
        self.served, self.image = served, image
        self.http: Counter = Counter()
        self.grpc: Counter = Counter()
        self.slowest: dict = {}  # outcome (HTTP status, exception name or gRPC code name) -> seconds
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._http, daemon=True),
                         threading.Thread(target=self._grpc, daemon=True)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def wait_for(self, condition, timeout: float, what: str) -> None:
        """Until ``condition()`` holds; fails after ``timeout`` seconds saying ``what`` and the outcomes so far."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, (f"{what} within {timeout} s: HTTP {dict(self.http)}, "
                                                 f"gRPC {dict(self.grpc)}")
            time.sleep(0.05)

    def _count(self, counter: Counter, outcome, start: float) -> None:
        self.slowest[outcome] = max(self.slowest.get(outcome, 0.0), time.monotonic() - start)
        counter[outcome] += 1

    def _http(self) -> None:
        import httpx

        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    status = client.post(f"{self.served.http_url}/analyze",
                                         files={"image": ("s.jpg", self.image, "image/jpeg")}).status_code
                    self._count(self.http, status, start)
                    if status != 200:
                        time.sleep(0.2)  # as a client backing off; a tight loop of refusals would starve the host
                except httpx.TransportError as exc:  # the gateway itself is down: nothing listens
                    self._count(self.http, type(exc).__name__, start)
                    time.sleep(0.2)

    def _grpc(self) -> None:
        import grpc

        from braintumor.clients.v1 import braintumor_pb2, braintumor_pb2_grpc

        with grpc.insecure_channel(self.served.grpc_target) as channel:
            stub = braintumor_pb2_grpc.BrainTumorStub(channel)
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    stub.Analyze(braintumor_pb2.AnalyzeRequest(image=self.image), timeout=30)
                    self._count(self.grpc, "OK", start)
                except grpc.RpcError as exc:
                    self._count(self.grpc, exc.code().name, start)
                    time.sleep(0.2)


class ProcessTree:
    """The host's processes read from /proc: who is below a ``braintumor serve`` and what outlived it."""

    @staticmethod
    def table() -> dict[int, tuple[int, str, bool]]:
        """pid -> (parent pid, command line, zombie)."""
        table = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            table[int(pid)] = (int(fields[1]), cmd, fields[0] == "Z")
        return table

    def descendants(self, root: int) -> dict[int, str]:
        """Every live process below ``root`` (Triton, its python stubs, the gateway and its workers, the gRPC server)."""
        table, found, frontier = self.table(), {}, [root]
        while frontier:
            parent = frontier.pop()
            for pid, (ppid, cmd, zombie) in table.items():
                if ppid == parent and pid not in found and not zombie:
                    found[pid] = cmd
                    frontier.append(pid)
        return found

    def alive(self, pids) -> list[str]:
        """``pid: command`` of each of ``pids`` still running (zombies do not count)."""
        table = self.table()
        return [f"{pid}: {table[pid][1]}" for pid in pids if pid in table and not table[pid][2]]


@pytest.fixture
def proc_tree() -> ProcessTree:
    return ProcessTree()

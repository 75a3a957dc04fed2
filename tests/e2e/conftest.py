"""e2e fixtures: `braintumor serve` as a real subprocess group (Triton + gateway + gRPC), started once per session on
the tiny model, plus a factory for tests that need their own (fault drills)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
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
    """One `braintumor serve` on the tiny model with its own Triton ports, shared by SDK/score/loadtest e2e tests."""
    from braintumor.serving.triton_embedded import free_port

    instance = start_serve("--model-repository", str(tiny_repository),
                           "--triton-http-port", str(free_port()), "--triton-grpc-port", str(free_port()),
                           "--triton-metrics-port", str(free_port()))
    try:
        yield instance
    finally:
        instance.stop()


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

"""CPU and processes for bench_gateway.py: user + system CPU seconds of a serving process tree by role, read around
each cell, the wait for the servers to go quiet, and starting checks / stopping of the servers the bench starts."""

from __future__ import annotations

import os
import subprocess
import time

CPU_ROLES = ("gateway", "grpc", "triton", "nginx")


class CpuMeter:
    """User + system CPU seconds of a process tree by role (loadtest/memory.py ``role_of``), read before and after a
    cell; processes that appear or exit in between are counted from zero / dropped (none do while serving)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid

    def read(self) -> dict[int, tuple[str, float]]:
        import psutil

        from braintumor.loadtest.memory import role_of

        if self.pid is None:
            return {}
        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return {}
        out = {}
        for process in processes:
            try:
                times = process.cpu_times()
                out[process.pid] = (role_of(process.cmdline()), times.user + times.system)
            except psutil.Error:
                continue
        return out

    @staticmethod
    def per_image_ms(before: dict, after: dict, images: int) -> dict[str, float]:
        """CPU milliseconds per answered image, by role."""
        used = dict.fromkeys(CPU_ROLES, 0.0)
        for pid, (role, seconds) in after.items():
            if role in used:
                used[role] += seconds - before.get(pid, (role, 0.0))[1]
        return {role: (1000.0 * s / images if images else float("nan")) for role, s in used.items()}


def settle(meters: list[CpuMeter], most_s: float, quiet: float = 0.05) -> float:
    """Wait until every meter's process tree uses under ``quiet`` of a core over one second (the front doors warm
    their explainers in the background after readiness, which would count as serving CPU), at most ``most_s``."""
    start = time.monotonic()
    while time.monotonic() - start < most_s:
        before = [m.read() for m in meters]
        time.sleep(1.0)
        busy = [sum(s for _, s in m.read().values()) - sum(s for _, s in b.values()) for m, b in zip(meters, before)]
        if all(b < quiet for b in busy):
            break
    return time.monotonic() - start


def measured(meter: CpuMeter, run) -> tuple[dict, dict[str, float]]:
    """The cell's result and CPU ms per image by role, with ``client``: this process, the load generator, which
    shares the host with the servers (the model-alone line has no such neighbour)."""
    before, client = meter.read(), os.times()
    result = run()
    used = os.times()
    cpu = CpuMeter.per_image_ms(before, meter.read(), result["n"])
    spent = (used.user - client.user) + (used.system - client.system)
    cpu["client"] = 1000.0 * spent / result["n"] if result["n"] else float("nan")
    return result, cpu


class RoleMeter(CpuMeter):
    """A process tree that is one role as a whole: the baseline's uvicorn process (its 'gateway'), nginx."""

    def __init__(self, pid: int | None, role: str) -> None:
        super().__init__(pid)
        self.role = role

    def read(self) -> dict[int, tuple[str, float]]:
        return {pid: (self.role, seconds) for pid, (_, seconds) in super().read().items()}


class Meters(CpuMeter):
    """Several process trees read as one (`braintumor serve` and the nginx in front of it)."""

    def __init__(self, *meters: CpuMeter) -> None:
        super().__init__(None)
        self.meters = meters

    def read(self) -> dict[int, tuple[str, float]]:
        return {pid: value for meter in self.meters for pid, value in meter.read().items()}



# -- processes ----------------------------------------------------------------------------------------------------
def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode} before {url} was ready")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

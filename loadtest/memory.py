"""The soak's memory watch: the resident memory of `braintumor serve` and all its children, per role, sampled while
locust runs, and the growth verdict (least-squares slope over the second half of the run)."""

from __future__ import annotations

import csv
import itertools
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Steady growth beyond this (least-squares slope of RSS over the second half of a soak) fails it. A leak of one
# response's PNGs (~30 kB) per request at 4 req/s is ~7 MB/min; allocator noise stays within a few MB over 10 min.
MAX_GROWTH_MB_PER_MIN = 2.0
# A slope is judged only over at least this much time: within a minute, a few MB of allocator noise or warm-up
# already reads as ~10 MB/min (measured: a 60 s soak's second half).
MIN_JUDGED_SPAN_S = 240.0
RSS_INTERVAL_S = 10.0
ROLES = ("supervisor", "gateway", "grpc", "triton", "other")


def role_of(cmdline: Sequence[str]) -> str:
    """Which part of `braintumor serve` a process is, from its command line."""
    if is_serve(cmdline):
        return "supervisor"
    text = " ".join(cmdline)
    if "tritonserver" in text or "triton_python_backend_stub" in text:
        return "triton"
    if "grpc-server" in text:
        return "grpc"
    if "bentoml" in text or "braintumor.serving.service" in text or "circus" in text:
        return "gateway"
    return "other"


def is_serve(cmdline: Sequence[str]) -> bool:
    """True for the `braintumor serve` supervisor (console script or ``-m braintumor.serving.cli``)."""
    return any(tok.endswith(("/braintumor", "braintumor.serving.cli")) or tok == "braintumor"
               for tok, nxt in itertools.pairwise(cmdline) if nxt == "serve")


def port_of(url: str) -> int:
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    if ":" not in rest:
        return 443 if url.startswith("https") else 80
    return int(rest.rsplit(":", 1)[1])


def find_serve_pid(url: str) -> int:
    """The `braintumor serve` process behind ``url``: the listener on its port, then up to its serve ancestor
    (the listener itself when it was not started by `braintumor serve`)."""
    import psutil

    port = port_of(url)
    listeners = {c.pid for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
    if not listeners:
        raise ValueError(f"no process of this user listens on port {port} ({url}); the soak needs the server on this "
                         "host to watch its memory: start `braintumor serve` here, or pass --serve-pid PID")
    process = psutil.Process(min(listeners))
    for ancestor in [process, *process.parents()]:
        try:
            if is_serve(ancestor.cmdline()):
                return ancestor.pid
        except psutil.Error:
            continue
    return process.pid


def sample_rss(pid: int) -> dict[str, float]:
    """Resident memory (MB) of ``pid`` and all its descendants, summed per role, plus ``total`` and ``processes``."""
    import psutil

    root = psutil.Process(pid)
    sample = dict.fromkeys(ROLES, 0.0)
    count = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            rss = process.memory_info().rss / 2**20
            role = role_of(process.cmdline())
        except psutil.Error:  # exited between listing and reading
            continue
        sample[role] += rss
        count += 1
    sample["total"] = sum(sample[r] for r in ROLES)
    sample["processes"] = count
    return sample


def growth_slope(times_s: Sequence[float], values_mb: Sequence[float]) -> float | None:
    """Least-squares slope in MB/min of the second half of the series (the first half is warm-up: caches and
    allocator pools fill); None with fewer than 3 points in that half."""
    half = len(times_s) // 2
    t, v = times_s[half:], values_mb[half:]
    if len(t) < 3:
        return None
    mean_t, mean_v = sum(t) / len(t), sum(v) / len(v)
    spread = sum((x - mean_t) ** 2 for x in t)
    if spread == 0:
        return None
    return sum((x - mean_t) * (y - mean_v) for x, y in zip(t, v)) / spread * 60.0


@dataclass
class RssRecorder:
    pid: int
    rows: list[dict] = field(default_factory=list)
    start: float = field(default_factory=time.monotonic)

    def record(self) -> None:
        try:
            self.rows.append({"elapsed_s": round(time.monotonic() - self.start, 1), **sample_rss(self.pid)})
        except Exception as exc:  # noqa: BLE001 - the server went away; the load results will show it
            print(f"rss sample failed: {exc}", file=sys.stderr)

    def write(self, path: Path) -> None:
        columns = ["elapsed_s", *(f"{r}_mb" for r in ROLES), "total_mb", "processes"]
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for row in self.rows:
                writer.writerow([row["elapsed_s"], *(f"{row[r]:.1f}" for r in (*ROLES, "total")), row["processes"]])

    def verdict(self, limit_mb_per_min: float, min_span_s: float = MIN_JUDGED_SPAN_S) -> dict:
        """Slope per role (and total) over the second half. ``judged`` when that half spans ``min_span_s``; then
        ``ok`` is False if any slope is over the limit. A shorter run records and reports, but never fails."""
        times = [row["elapsed_s"] for row in self.rows]
        second_half = times[len(times) // 2:]
        span = second_half[-1] - second_half[0] if second_half else 0.0
        slopes = {r: growth_slope(times, [row[r] for row in self.rows])
                  for r in (*ROLES, "total") if any(row[r] for row in self.rows)}
        judged = span >= min_span_s and bool(slopes) and all(s is not None for s in slopes.values())
        growing = sorted(r for r, s in slopes.items() if judged and s > limit_mb_per_min)
        return {"samples": len(self.rows), "second_half_s": round(span, 1), "judged": judged,
                "limit_mb_per_min": limit_mb_per_min,
                "slope_mb_per_min": {r: None if s is None else round(s, 3) for r, s in slopes.items()},
                "growing": growing, "ok": not growing}

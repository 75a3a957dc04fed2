"""locust's CSV results read back (``*_stats.csv``, ``*_failures.csv``) and the Markdown summary table."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RequestStats:
    """One row of locust's ``*_stats.csv``: a request name, or ``total`` for locust's Aggregated row."""

    type: str
    name: str
    requests: int
    failures: int
    rps: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    avg_ms: float | None
    max_ms: float | None


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):  # locust writes "N/A" for names without requests
        return None
    return None if math.isnan(value) else value


def read_stats(path: Path) -> list[RequestStats]:
    """Rows of a locust stats CSV (locust 2.x column names); the Aggregated row last, named ``total``."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"Name", "Request Count", "Failure Count", "50%", "95%", "99%"} <= set(rows[0]):
        raise ValueError(f"{path} is not a locust stats CSV (columns: {', '.join(rows[0])})")
    stats = []
    for row in rows:
        total = row["Name"] == "Aggregated" and not row.get("Type")
        stats.append(RequestStats(
            type=row.get("Type", ""), name="total" if total else row["Name"],
            requests=int(row["Request Count"]), failures=int(row["Failure Count"]),
            rps=_number(row.get("Requests/s")) or 0.0, p50_ms=_number(row["50%"]), p95_ms=_number(row["95%"]),
            p99_ms=_number(row["99%"]), avg_ms=_number(row.get("Average Response Time")),
            max_ms=_number(row.get("Max Response Time"))))
    return sorted(stats, key=lambda s: s.name == "total")


def read_failures(path: Path) -> list[dict]:
    """Rows of locust's ``*_failures.csv``: name, error, occurrences (empty when the file is absent)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{"name": row["Name"], "error": row["Error"], "occurrences": int(row["Occurrences"])}
                for row in csv.DictReader(f)]


def format_table(stats: Sequence[RequestStats]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    lines = ["| request | reqs | fails | req/s | p50 ms | p95 ms | p99 ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    for s in stats:
        label = f"{s.type} {s.name}".strip() if s.name != "total" else "**total**"
        lines.append(f"| {label} | {s.requests} | {s.failures} | {s.rps:.2f} | {ms(s.p50_ms)} | {ms(s.p95_ms)} "
                     f"| {ms(s.p99_ms)} |")
    return "\n".join(lines)

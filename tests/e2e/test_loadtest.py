"""`braintumor loadtest` against a real `braintumor serve` (tiny model): a 10 s headless locust run per front door
with zero failures, locust's CSV and HTML, a parseable summary, and a process that exits; the soak profile for 15 s
(memory recorded, no verdict that short) and, marked slow, for its full 20 minutes."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

# Never import locust into the test process: importing it monkey-patches the whole interpreter with gevent, which
# deadlocks every later in-process gRPC test. Locust runs only in the subprocesses `braintumor loadtest` starts.
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="pip install -e '.[loadtest]'")]


@pytest.fixture(scope="module")
def images(tmp_path_factory, slice_jpeg) -> Path:
    """Synthetic slices, so the test needs no real data (the locustfiles default to ../shared/data/brisc2025)."""
    folder = tmp_path_factory.mktemp("load_images")
    (folder / "a.jpg").write_bytes(slice_jpeg)
    return folder


def loadtest(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "braintumor.serving.cli", "loadtest", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def url_of(served, target: str) -> str:
    return served.http_url if target == "http" else served.grpc_target


@pytest.mark.parametrize("target, shape", [("http", "flat"), ("grpc", "step")])
def test_loadtest_smoke(served, images, tmp_path, target, shape):
    out = tmp_path / "load"
    done = loadtest("--target", target, "--url", url_of(served, target), "--users", "2", "--spawn-rate", "2",
                    "--duration", "10s", "--shape", shape, "--steps", "2", "--images", str(images), "--out", str(out),
                    timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["problems"] == [] and summary["failures"] == []
    rows = {row["name"]: row for row in summary["requests"]}
    assert rows["total"]["requests"] > 0 and rows["total"]["failures"] == 0
    assert rows["/analyze" if target == "http" else "Analyze"]["requests"] > 0
    with open(out / f"{target}_stats.csv", newline="") as f:
        stats = list(csv.DictReader(f))
    assert stats[-1]["Name"] == "Aggregated" and int(stats[-1]["Request Count"]) == rows["total"]["requests"]
    assert (out / f"{target}.html").stat().st_size > 0
    assert "| **total** |" in done.stdout
    if shape == "step":  # 2 users in 2 steps: 1 user, then 2
        with open(out / f"{target}_stats_history.csv", newline="") as f:
            users = [int(row["User Count"]) for row in csv.DictReader(f)]
        assert 1 in users and max(users) == 2


def test_loadtest_reports_failures(served, images, tmp_path):
    """Failed requests (here a 404 from a --locustfile of our own) give exit code 1 and are listed in the summary."""
    locustfile = tmp_path / "failing.py"
    locustfile.write_text(
        "from locust import FastHttpUser, constant, task\n"
        "class U(FastHttpUser):\n"
        "    wait_time = constant(0.2)\n"
        "    @task\n"
        "    def missing(self):\n"
        "        self.client.get('/no/such/route', name='missing')\n")
    out = tmp_path / "load"
    done = loadtest("--target", "http", "--url", served.http_url, "--users", "1", "--duration", "3s",
                    "--images", str(images), "--locustfile", str(locustfile), "--out", str(out), timeout=90)
    assert done.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["ok"] and "requests failed" in summary["problems"][0]
    assert summary["failures"][0]["name"] == "missing"
    assert "FAILED" in done.stderr


def test_loadtest_clear_error_without_images(served, tmp_path):
    done = loadtest("--target", "grpc", "--url", served.grpc_target, "--duration", "5s",
                    "--images", str(tmp_path), "--out", str(tmp_path / "o"), timeout=90)
    assert done.returncode == 1
    assert "no .jpg/.jpeg/.png/.dcm files under" in done.stderr


def _soak(served, images, out: Path, duration: str, timeout: float, *extra: str) -> subprocess.CompletedProcess:
    script = Path(__file__).resolve().parents[2] / "loadtest" / "soak.py"
    return subprocess.run([sys.executable, str(script), "--target", "http", "--url", served.http_url,
                           "--serve-pid", str(served.proc.pid), "--images", str(images), "--out", str(out),
                           "--duration", duration, *extra],
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_soak_short(served, images, tmp_path):
    """The soak machinery end to end, shortened to 15 s: flat rate, RSS of every serve process each second, no verdict
    (memory is judged over 4 minutes or more; 60 s gave none either, the slow test below does)."""
    out = tmp_path / "soak"
    done = _soak(served, images, out, "15s", 120, "--rss-interval", "1", "--rate", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["profile"] == "soak" and summary["rate_rps"] == 2
    total = next(row for row in summary["requests"] if row["name"] == "total")
    assert total["failures"] == 0 and 1.0 < total["rps"] < 4.0  # held near the rate, not as fast as possible
    memory = summary["memory"]
    assert memory["samples"] >= 10 and not memory["judged"] and memory["ok"]
    assert {"gateway", "grpc", "triton"} <= set(memory["slope_mb_per_min"])
    with open(out / "rss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == memory["samples"] and all(float(row["triton_mb"]) > 0 for row in rows)


@pytest.mark.slow
def test_soak_20min(served, images, tmp_path):
    """The real soak: 20 minutes at 4 req/s; fails on any failed request or steady memory growth."""
    out = tmp_path / "soak"
    done = _soak(served, images, out, "20m", 20 * 60 + 180)
    assert done.returncode == 0, done.stdout + done.stderr
    memory = json.loads((out / "summary.json").read_text())["memory"]
    assert memory["judged"] and memory["ok"], memory

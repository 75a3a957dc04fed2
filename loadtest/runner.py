"""Running locust: the locustfile of a front door, locust's command line, the run itself in its own process group
under a hard timeout (a hung run, e.g. a gRPC channel left open, is killed, never waited on), and the readiness
check that refuses to load a server that is not up."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..serving.supervisor import grpc_serving, http_ready, stop_group

TARGETS = {"http": ("locustfile_http.py", "http://127.0.0.1:3000"), "grpc": ("locustfile_grpc.py", "127.0.0.1:50051")}
STOP_TIMEOUT_S = 10  # locust lets running tasks finish for this long at the end (no half-done requests counted)
START_MARGIN_S = 60  # on top of the run time and stop timeout before the hard kill
KILL_GRACE_S = 5.0  # after the hard limit: SIGTERM to locust's group, then SIGKILL after this long


def find_locustfile(target: str, explicit: str | os.PathLike | None = None) -> Path:
    """The locustfile for ``target``: ``explicit``, else the one in this package (checkout or wheel)."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"--locustfile {path} does not exist")
        return path.resolve()
    return Path(__file__).resolve().parent / TARGETS[target][0]


def parse_duration(text: str) -> int:
    """Seconds of a locust time span (``90``, ``30s``, ``5m``, ``1h30m``), parsed by locust's own parser, the one
    that reads ``--run-time``."""
    try:
        return _locust_timespan().parse_timespan(str(text).strip().lower())
    except ValueError as exc:
        raise ValueError(f"duration {text!r} is not a time span; use e.g. 30s, 5m, 1h30m or plain seconds") from exc


def _locust_timespan():
    """locust's ``locust/util/timespan.py``, loaded as a file: importing the ``locust`` package gevent-patches the
    whole process (this one only starts and watches locust), and that module needs nothing else of locust."""
    spec = importlib.util.find_spec("locust")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("locust is not installed; install the load-test extra: pip install -e '.[loadtest]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "util" / "timespan.py"
    module_spec = importlib.util.spec_from_file_location("_locust_timespan", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def locust_argv(locustfile: Path, url: str, users: int, spawn_rate: float, seconds: int, prefix: Path) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--host", url,
            "--users", str(users), "--spawn-rate", str(spawn_rate), "--run-time", f"{seconds}s",
            "--stop-timeout", str(STOP_TIMEOUT_S), "--csv", str(prefix), "--html", f"{prefix}.html",
            "--only-summary", "--loglevel", "WARNING"]


def run_group(argv: Sequence[str], env: dict, timeout: float, log_path: Path,
              on_tick: Callable[[], None] | None = None, tick_s: float = 1.0) -> tuple[int, bool]:
    """Run ``argv`` in its own process group with output to ``log_path``; call ``on_tick`` every ``tick_s`` while
    it runs. Past ``timeout`` the whole group gets SIGTERM, then SIGKILL. Returns (exit code, timed out)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        next_tick = time.monotonic()
        timed_out = False
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if now > deadline:
                    timed_out = True
                    break
                if on_tick is not None and now >= next_tick:
                    on_tick()
                    next_tick += tick_s
                time.sleep(0.2)
        finally:
            if proc.poll() is None:  # timed out, or interrupted (Ctrl-C): take the group down
                stop_group(proc, KILL_GRACE_S, "locust")
    return proc.returncode, timed_out


def check_ready(target: str, url: str) -> None:
    """Refuse to start locust against a server that is not up: every request would fail for the whole run."""
    ready = http_ready(f"{url.rstrip('/')}/readyz") if target == "http" else grpc_serving(url.split("://", 1)[-1])
    if not ready:
        probe = "GET /readyz" if target == "http" else "the gRPC health check"
        raise ValueError(f"the {target} front door at {url} is not ready ({probe}); start `braintumor serve` "
                         "and wait for 'braintumor is ready', or fix --url")

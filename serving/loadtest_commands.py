"""CLI subcommand `braintumor loadtest`: locust, headless, against a running `braintumor serve`; a summary of the run;
and the soak profile, which also records the server's memory and fails on steady growth.

The locustfiles live in the checkout's top-level ``loadtest/`` folder (not in the wheel); they are found next to
this package in an editable install or in ``./loadtest``, or given with ``--locustfile``. locust runs in its own
process group under a hard timeout, so a hung run (e.g. a gRPC channel left open) is killed, never waited on.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .supervisor import stop_group

TARGETS = {"http": ("locustfile_http.py", "http://127.0.0.1:3000"), "grpc": ("locustfile_grpc.py", "127.0.0.1:50051")}
LOAD_DEFAULTS = {"users": 8, "spawn_rate": 2.0, "duration": "30s"}
SOAK_DEFAULTS = {"users": 4, "spawn_rate": 2.0, "duration": "20m"}
SOAK_RATE = 4.0  # requests/s: a flat load a 2-core CPU host serves with room to spare (README, performance)
# Steady growth beyond this (least-squares slope of RSS over the second half of a soak) fails it. A leak of one
# response's PNGs (~30 kB) per request at 4 req/s is ~7 MB/min; allocator noise stays within a few MB over 10 min.
MAX_GROWTH_MB_PER_MIN = 2.0
# A slope is judged only over at least this much time: within a minute, a few MB of allocator noise or warm-up
# already reads as ~10 MB/min (measured: a 60 s soak's second half).
MIN_JUDGED_SPAN_S = 240.0
RSS_INTERVAL_S = 10.0
STOP_TIMEOUT_S = 10  # locust lets running tasks finish for this long at the end (no half-done requests counted)
START_MARGIN_S = 60  # on top of the run time and stop timeout before the hard kill
KILL_GRACE_S = 5.0  # after the hard limit: SIGTERM to locust's group, then SIGKILL after this long
ROLES = ("supervisor", "gateway", "grpc", "triton", "other")


# -- finding and running locust ----------------------------------------------------------------------------------

def find_locustfile(target: str, explicit: str | os.PathLike | None = None) -> Path:
    """The locustfile for ``target``: ``explicit``, else ``loadtest/<file>`` of the source checkout or of the CWD."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"--locustfile {path} does not exist")
        return path.resolve()
    name = TARGETS[target][0]
    candidates = [Path(__file__).resolve().parents[1] / "loadtest" / name, Path.cwd() / "loadtest" / name]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{name} not found (looked in {', '.join(str(p.parent) for p in candidates)}); the locustfiles live in the "
        "loadtest/ folder of the source checkout and are not installed with the wheel: run from a checkout "
        "(editable install) or pass --locustfile PATH")


def parse_duration(text: str) -> int:
    """Seconds of a locust-style time span: ``90``, ``30s``, ``5m``, ``1h30m``."""
    text = str(text).strip().lower()
    if text.isdigit():
        return int(text)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not text or parts is None:
        raise ValueError(f"duration {text!r} is not a time span; use e.g. 30s, 5m, 1h30m or plain seconds")
    hours, minutes, seconds = (int(p or 0) for p in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


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


# -- the summary -------------------------------------------------------------------------------------------------

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


# -- memory of the server (soak) ---------------------------------------------------------------------------------

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


# -- the command -------------------------------------------------------------------------------------------------

def _child_env(args: argparse.Namespace, shape: str, users: int, rate: float | None) -> dict[str, str]:
    """locust's environment: what the locustfiles read (images, API key, shape, per-user rate, cache bust)."""
    # The command decides these three; the others (e.g. BRAINTUMOR_LOADTEST_MAX_IMAGES) pass through.
    env = {k: v for k, v in os.environ.items() if k not in (
        "BRAINTUMOR_LOADTEST_SHAPE", "BRAINTUMOR_LOADTEST_STEPS", "BRAINTUMOR_LOADTEST_USER_RATE")}
    env["PYTHONUNBUFFERED"] = "1"
    images = args.images or os.environ.get("BRAINTUMOR_LOADTEST_IMAGES")
    if images:
        if not Path(images).is_dir():
            raise NotADirectoryError(f"--images {images} is not a folder of slices")
        env["BRAINTUMOR_LOADTEST_IMAGES"] = str(Path(images).resolve())
    if args.api_key:
        env["BRAINTUMOR_API_KEY"] = args.api_key  # via the environment: an argv is visible to every user in ps
    if shape != "flat":
        env["BRAINTUMOR_LOADTEST_SHAPE"] = shape
        env["BRAINTUMOR_LOADTEST_STEPS"] = str(args.steps)
    if rate:
        env["BRAINTUMOR_LOADTEST_USER_RATE"] = str(rate / users)
    if args.profile == "soak":
        env["BRAINTUMOR_LOADTEST_CACHE_BUST"] = "0"  # a bounded set of cached explanations: growth means a leak
    return env


def check_ready(target: str, url: str) -> None:
    """Refuse to start locust against a server that is not up: every request would fail for the whole run."""
    from .supervisor import grpc_serving, http_ready

    ready = http_ready(f"{url.rstrip('/')}/readyz") if target == "http" else grpc_serving(url.split("://", 1)[-1])
    if not ready:
        probe = "GET /readyz" if target == "http" else "the gRPC health check"
        raise ValueError(f"the {target} front door at {url} is not ready ({probe}); start `braintumor serve` "
                         "and wait for 'braintumor is ready', or fix --url")


def _loadtest(args: argparse.Namespace) -> int:
    soak = args.profile == "soak"
    defaults = SOAK_DEFAULTS if soak else LOAD_DEFAULTS
    users = args.users or defaults["users"]
    spawn_rate = args.spawn_rate or defaults["spawn_rate"]
    seconds = parse_duration(args.duration or defaults["duration"])
    if users < 1 or spawn_rate <= 0 or seconds < 1:
        raise ValueError("--users, --spawn-rate and --duration must be positive")
    if importlib.util.find_spec("locust") is None:
        raise FileNotFoundError("locust is not installed; install the load-test extra: pip install -e '.[loadtest]'")
    locustfile = find_locustfile(args.target, args.locustfile)
    url = args.url or TARGETS[args.target][1]
    shape = "soak" if soak else args.shape
    rate = args.rate if args.rate is not None else (SOAK_RATE if soak else None)
    env = _child_env(args, shape, users, rate)
    check_ready(args.target, url)
    recorder = RssRecorder(args.serve_pid or find_serve_pid(url)) if soak else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / args.target
    log_path = out / f"{args.target}_locust.log"

    if recorder is not None:
        print(f"watching the memory of PID {recorder.pid} and its children every {args.rss_interval:g} s")
    print(f"locust: {args.target} {url}, {users} users (+{spawn_rate:g}/s), {seconds} s, shape {shape}"
          f"{f', {rate:g} req/s' if rate else ''}; log {log_path}", flush=True)
    started = time.time()
    limit = seconds + STOP_TIMEOUT_S + START_MARGIN_S
    code, timed_out = run_group(locust_argv(locustfile, url, users, spawn_rate, seconds, prefix), env, limit,
                                log_path, on_tick=recorder.record if recorder else None, tick_s=args.rss_interval)
    stats_path = Path(f"{prefix}_stats.csv")
    if not stats_path.is_file():
        print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
        print(f"braintumor loadtest: locust wrote no {stats_path} (exit code {code}); its log is above",
              file=sys.stderr)
        return 1

    stats = read_stats(stats_path)
    failures = read_failures(Path(f"{prefix}_failures.csv"))
    total = next((s for s in stats if s.name == "total"), None)
    problems = []
    if timed_out:
        problems.append(f"locust did not finish within {limit} s and was killed")
    if total is None or total.requests == 0:
        problems.append("no request was completed")
    elif total.failures:
        problems.append(f"{total.failures} of {total.requests} requests failed")
    elif code != 0 and not timed_out:  # locust exits 1 on a failure or error its CSV may not show
        problems.append(f"locust exited with code {code}; see {log_path}")
    summary = {"target": args.target, "url": url, "profile": args.profile, "shape": shape, "users": users,
               "spawn_rate": spawn_rate, "duration_s": seconds, "rate_rps": rate,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
               "wall_s": round(time.time() - started, 1), "locust_exit_code": code,
               "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
               "requests": [asdict(s) for s in stats], "failures": failures,
               "files": {"stats_csv": str(stats_path), "html": f"{prefix}.html", "log": str(log_path)}}
    if recorder is not None:
        recorder.record()
        recorder.write(out / "rss.csv")
        summary["files"]["rss_csv"] = str(out / "rss.csv")
        memory = summary["memory"] = recorder.verdict(args.max_growth)
        if not memory["ok"]:
            problems.append(f"memory grows steadily: {', '.join(memory['growing'])} over {args.max_growth:g} MB/min "
                            f"in the second half (slopes {memory['slope_mb_per_min']})")
    summary["ok"] = not problems
    summary["problems"] = problems
    _report(summary, stats, out)
    return 0 if summary["ok"] else 1


def _report(summary: dict, stats: Sequence[RequestStats], out: Path) -> None:
    """Write summary.json and summary.md; print the table, the first failures and the verdict."""
    table = format_table(stats)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(f"{summary['target']} {summary['url']}: {summary['users']} users, "
                                    f"{summary['duration_s']} s, shape {summary['shape']}, 1-min load average "
                                    f"{summary['load_avg_1m']} on {summary['cpus']} CPUs\n\n{table}\n")
    print(table)
    for failure in summary["failures"][:10]:
        print(f"failed: {failure['name']} x{failure['occurrences']}: {failure['error'][:300]}", file=sys.stderr)
    memory = summary.get("memory")
    if memory is not None:
        print(f"memory slope over the second half, MB/min (limit {memory['limit_mb_per_min']:g}): "
              f"{memory['slope_mb_per_min']}; {summary['files']['rss_csv']}")
        if not memory["judged"]:
            print(f"note: no memory-growth verdict: the second half of the run ({memory['second_half_s']:g} s) is "
                  f"shorter than {MIN_JUDGED_SPAN_S:g} s; run longer (the soak default is 20m)", file=sys.stderr)
    print(f"report: {summary['files']['html']}, {out / 'summary.json'}")
    for problem in summary["problems"]:
        print(f"braintumor loadtest: FAILED: {problem}", file=sys.stderr)


def register(sub) -> None:
    p = sub.add_parser(
        "loadtest", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="locust load test (headless) of a running `braintumor serve`; summary table, CSV and HTML report",
        description="Run locust headless against a running `braintumor serve` (HTTP gateway or gRPC API) with a "
                    "weighted mix of analyze and explain requests on real slices; writes locust's CSV and HTML "
                    "report, DIR/summary.json and DIR/summary.md, and exits 1 if any request failed. "
                    "--profile soak holds a flat request rate (default 20 minutes) while recording the server's "
                    "memory (DIR/rss.csv) and also fails on steady memory growth.")
    p.add_argument("--target", choices=sorted(TARGETS), required=True, help="front door to load")
    p.add_argument("--url", help="gateway URL (http) or HOST:PORT (grpc); default http://127.0.0.1:3000 or "
                                 "127.0.0.1:50051")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the CSVs, HTML report and summary")
    p.add_argument("--profile", choices=("load", "soak"), default="load",
                   help="load: as fast as the users go; soak: flat --rate for long, watching memory")
    p.add_argument("--users", type=int, help=f"concurrent users (default {LOAD_DEFAULTS['users']}; soak "
                                             f"{SOAK_DEFAULTS['users']})")
    p.add_argument("--spawn-rate", type=float, help="users started per second (default 2)")
    p.add_argument("--duration", help="run time: 30s, 5m, 1h30m, or seconds (default 30s; soak 20m)")
    p.add_argument("--shape", choices=("flat", "step"), default="flat",
                   help="flat: all users for the whole run; step: users added in --steps equal steps")
    p.add_argument("--steps", type=int, default=4, help="steps of the step shape")
    p.add_argument("--rate", type=float, help=f"total requests/s held flat (constant throughput per user); default: "
                                              f"none for load (closed loop), {SOAK_RATE:g} for soak")
    p.add_argument("--images", metavar="DIR", help="folder of real JPEG/PNG/DICOM slices (default "
                                                   "$BRAINTUMOR_LOADTEST_IMAGES, else ../shared/data/brisc2025)")
    p.add_argument("--api-key", help="API key of the server (default: $BRAINTUMOR_API_KEY, if set)")
    p.add_argument("--locustfile", metavar="PATH", help="locustfile to run instead of loadtest/locustfile_<target>.py")
    p.add_argument("--serve-pid", type=int, help="soak: PID of `braintumor serve` (default: found from --url's port)")
    p.add_argument("--rss-interval", type=float, default=RSS_INTERVAL_S, help="soak: seconds between memory samples")
    p.add_argument("--max-growth", type=float, default=MAX_GROWTH_MB_PER_MIN,
                   help="soak: fail when a process group's memory grows faster than this (MB/min, second half)")
    p.set_defaults(func=_loadtest)

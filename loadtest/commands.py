"""CLI subcommand `braintumor loadtest`: locust, headless, against a running `braintumor serve`; a summary of the run;
and the soak profile, which also records the server's memory and fails on steady growth. The parts: runner.py
(locust in its own process group), stats.py (its CSVs and the table), memory.py (the soak's memory watch)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ..clients.masks import MASK_FORMATS
from .memory import MAX_GROWTH_MB_PER_MIN, MIN_JUDGED_SPAN_S, RSS_INTERVAL_S, RssRecorder, find_serve_pid
from .runner import (START_MARGIN_S, STOP_TIMEOUT_S, TARGETS, check_ready, find_locustfile, locust_argv, parse_duration,
                     run_group)
from .stats import RequestStats, format_table, read_failures, read_stats

LOAD_DEFAULTS = {"users": 8, "spawn_rate": 2.0, "duration": "30s"}
SOAK_DEFAULTS = {"users": 4, "spawn_rate": 2.0, "duration": "20m"}
API_KEY_ENV = "BRAINTUMOR_API_KEY"  # the variable the locustfiles read the key from
SOAK_RATE = 4.0  # requests/s: a flat load a 2-core CPU host serves with room to spare (README, performance)


def _child_env(args: argparse.Namespace, shape: str, users: int, rate: float | None) -> dict[str, str]:
    """locust's environment: what the locustfiles read (images, API key, shape, per-user rate, cache bust, heatmap,
    mask format)."""
    # The command decides these five; the others (e.g. BRAINTUMOR_LOADTEST_MAX_IMAGES) pass through.
    env = {k: v for k, v in os.environ.items() if k not in (
        "BRAINTUMOR_LOADTEST_SHAPE", "BRAINTUMOR_LOADTEST_STEPS", "BRAINTUMOR_LOADTEST_USER_RATE",
        "BRAINTUMOR_LOADTEST_HEATMAP", "BRAINTUMOR_LOADTEST_MASK_FORMAT")}
    env["BRAINTUMOR_LOADTEST_HEATMAP"] = "1" if args.heatmap else "0"
    env["BRAINTUMOR_LOADTEST_MASK_FORMAT"] = args.mask_format
    env["PYTHONUNBUFFERED"] = "1"
    images = args.images or os.environ.get("BRAINTUMOR_LOADTEST_IMAGES")
    if not images:
        raise ValueError("--images DIR is needed (or BRAINTUMOR_LOADTEST_IMAGES=DIR): a folder of a few real "
                         "JPEG/PNG/DICOM slices, e.g. the classification_task/test folder of a BRISC 2025 copy")
    if not Path(images).is_dir():
        raise NotADirectoryError(f"--images {images} is not a folder of slices")
    env["BRAINTUMOR_LOADTEST_IMAGES"] = str(Path(images).resolve())
    key = os.environ.get(args.api_key_env)
    if args.api_key_env != API_KEY_ENV and key is None:
        raise ValueError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    env.pop(API_KEY_ENV, None)
    if key:
        env[API_KEY_ENV] = key  # what the locustfiles read; never on a command line (visible to every user in ps)
    if shape != "flat":
        env["BRAINTUMOR_LOADTEST_SHAPE"] = shape
        env["BRAINTUMOR_LOADTEST_STEPS"] = str(args.steps)
    if rate:
        env["BRAINTUMOR_LOADTEST_USER_RATE"] = str(rate / users)
    if args.profile == "soak":
        env["BRAINTUMOR_LOADTEST_CACHE_BUST"] = "0"  # a bounded set of cached explanations: growth means a leak
    return env


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
        "loadtest", formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,  # --api-key: no
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
    p.add_argument("--images", metavar="DIR", help="folder of real JPEG/PNG/DICOM slices, searched recursively "
                                                   "(needed unless $BRAINTUMOR_LOADTEST_IMAGES names one)")
    p.add_argument("--heatmap", action="store_true",
                   help="analyze calls ask for the Grad-CAM heatmap too (explanations are on demand; default: not)")
    p.add_argument("--mask-format", choices=MASK_FORMATS, default=MASK_FORMATS[0],
                   help="how analyze calls ask for the mask: png (default) or rle (COCO run-length encoding)")
    p.add_argument("--api-key-env", default=API_KEY_ENV, metavar="VAR",
                   help="environment variable holding the server's API key, as `score` (the key never goes on the "
                        "command line); unset: no key is sent")
    p.add_argument("--locustfile", metavar="PATH", help="locustfile to run instead of loadtest/locustfile_<target>.py")
    p.add_argument("--serve-pid", type=int, help="soak: PID of `braintumor serve` (default: found from --url's port)")
    p.add_argument("--rss-interval", type=float, default=RSS_INTERVAL_S, help="soak: seconds between memory samples")
    p.add_argument("--max-growth", type=float, default=MAX_GROWTH_MB_PER_MIN,
                   help="soak: fail when a process group's memory grows faster than this (MB/min, second half)")
    p.set_defaults(func=_loadtest)

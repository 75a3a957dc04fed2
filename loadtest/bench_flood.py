"""Memory per process of a running `braintumor serve` before, at the end of and after a flood (issue 25).

    python loadtest/bench_flood.py --url http://127.0.0.1:3000 --grpc 127.0.0.1:50051 --images DIR \
        [--concurrency 128] [--seconds 20] [--settle 30]

Samples the resident memory of every process of the serve behind ``--url`` (supervisor, gateway workers, gRPC API,
tritonserver, each python-backend stub) at idle, floods /analyze over HTTP and gRPC Analyze at once (``concurrency``
closed-loop callers each, the generators of bench_load.py), samples again at the end and after ``settle`` seconds
of idle, and prints one table: MB per process at each moment and the growth that stayed. Nothing is asserted here
(tests/e2e/test_memory_bounds.py holds the python stubs to their bound); this is the measurement README quotes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path


def processes(serve_pid: int) -> dict[int, str]:
    """pid -> a short name (role and what it runs) for the serve process and all its descendants."""
    import psutil

    from braintumor.loadtest.memory import role_of

    root = psutil.Process(serve_pid)
    names = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            cmdline = process.cmdline()
        except psutil.Error:
            continue
        role = role_of(cmdline)
        model = next((arg for arg in cmdline if arg.endswith("/model.py")), "")
        what = "stub " + Path(model).parent.parent.name if model else process.name()
        names[process.pid] = f"{role}: {what}"
    return names


def rss_mb(pids) -> dict[int, float]:
    import psutil

    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            continue
    return out


async def flood(url: str, grpc_target: str, payloads: list[bytes], concurrency: int, seconds: float) -> dict:
    from braintumor.loadtest.bench_load import load_grpc, load_http

    http, grpc = await asyncio.gather(
        load_http(url.rstrip("/") + "/analyze", payloads, concurrency, seconds, heatmap=False),
        load_grpc(grpc_target, payloads, concurrency, seconds, heatmap=False))
    return {"http": http, "grpc": grpc}


def table(names: dict[int, str], moments: dict[str, dict[int, float]]) -> str:
    columns = list(moments)
    lines = [f"{'process':<44} " + " ".join(f"{c:>12}" for c in columns) + f" {'kept':>8}",
             "-" * (45 + 13 * len(columns) + 9)]
    for pid, name in sorted(names.items(), key=lambda item: item[1]):
        values = [moments[c].get(pid) for c in columns]
        cells = " ".join(f"{v:>12.0f}" if v is not None else f"{'-':>12}" for v in values)
        kept = values[-1] - values[0] if None not in (values[0], values[-1]) else float("nan")
        lines.append(f"{name[:36] + ' ' + str(pid):<44} {cells} {kept:>+8.0f}")
    totals = [sum(m.values()) for m in moments.values()]
    lines.append(f"{'total':<44} " + " ".join(f"{t:>12.0f}" for t in totals) + f" {totals[-1] - totals[0]:>+8.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the gateway of a `braintumor serve` here")
    parser.add_argument("--grpc", default="127.0.0.1:50051", help="its gRPC API")
    parser.add_argument("--images", type=Path, required=True, help="a folder of JPEG slices to send (16 are used)")
    parser.add_argument("--concurrency", type=int, default=128, help="callers per protocol")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the flood")
    parser.add_argument("--settle", type=float, default=30.0, help="idle seconds before the last sample")
    parser.add_argument("--json", type=Path, help="also write the samples here")
    args = parser.parse_args(argv)

    from braintumor.loadtest.memory import find_serve_pid

    payloads = [p.read_bytes() for p in sorted(args.images.rglob("*.jpg"))[:16]]
    if not payloads:
        parser.error(f"no .jpg files under {args.images}")
    names = processes(find_serve_pid(args.url))
    moments = {"idle": rss_mb(names)}
    result = asyncio.run(flood(args.url, args.grpc, payloads, args.concurrency, args.seconds))
    moments["flood end"] = rss_mb(names)
    time.sleep(args.settle)
    moments[f"+{args.settle:.0f} s idle"] = rss_mb(names)
    print(f"flood: {args.concurrency} HTTP + {args.concurrency} gRPC callers for {args.seconds:.0f} s; "
          f"HTTP {result['http']['n']} answered / {result['http']['failures']} failed, "
          f"gRPC {result['grpc']['n']} answered / {result['grpc']['failures']} failed")
    print(table(names, moments))
    if args.json:
        args.json.write_text(json.dumps({"names": names, "moments": moments,
                                         "answered": {k: v["n"] for k, v in result.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Batch-scoring benchmark: images/s of `braintumor score`'s engine over gRPC versus HTTP, at several concurrencies,
against a running `braintumor serve`; one run, a table of ratios.

    python loadtest/bench_score.py --url-grpc 127.0.0.1:50051 --url-http http://127.0.0.1:3000 \
        --input ../shared/data/brisc2025/classification_task/train --limit 200

Each cell scores the same first --limit files (sorted, as `score` does) into a fresh results file with masks, so it
measures the whole path a user pays for: reading the file, the call, the mask PNG and the durable row. One call is
made first on each protocol so connection set-up is not timed.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from braintumor.clients.aio import AsyncBrainTumorClient
from braintumor.clients.score_discovery import discover
from braintumor.clients.score_files import ErrorsFile, ResultsFile, result_columns
from braintumor.clients.scorer import Scorer


async def score_once(url: str, protocol: str, items, concurrency: int, workdir: Path) -> tuple[float, int]:
    """Seconds to score ``items`` and how many failed."""
    async with AsyncBrainTumorClient(url, protocol=protocol, timeout=120.0) as client:
        classes = list((await client.model())["classes"])
        await client.analyze(items[0].path)  # warm-up: channel / connection pool
        out = workdir / f"{protocol}-{concurrency}.csv"
        results = ResultsFile(out, "csv", result_columns(classes))
        errors = ErrorsFile(out.with_name(out.stem + ".errors.csv"))
        results.open()
        scorer = Scorer(client, results, errors, classes, masks_dir=workdir / f"masks-{protocol}-{concurrency}",
                        concurrency=concurrency)
        start = time.perf_counter()
        try:
            summary = await scorer.run(items)
        finally:
            results.close()
            errors.close()
        return time.perf_counter() - start, summary.failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url-grpc", default="127.0.0.1:50051", help="gRPC address of the running service")
    p.add_argument("--url-http", default="http://127.0.0.1:3000", help="HTTP address of the running service")
    p.add_argument("--input", type=Path, required=True, help="folder of slices (scored recursively, sorted)")
    p.add_argument("--limit", type=int, default=200, help="files per cell")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="requests in flight")
    args = p.parse_args(argv)

    items = discover(args.input)[: args.limit]
    if not items:
        p.error(f"--input {args.input} holds no JPEG/PNG/DICOM file")
    table: list[tuple[int, float, float]] = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-score-"))
    try:
        for concurrency in args.concurrency:
            rates = {}
            for protocol, url in (("grpc", args.url_grpc), ("http", args.url_http)):
                seconds, failed = asyncio.run(score_once(url, protocol, items, concurrency, workdir))
                rates[protocol] = (len(items) - failed) / seconds
                print(f"{protocol} concurrency {concurrency}: {len(items)} files in {seconds:.2f} s, {failed} failed",
                      file=sys.stderr)
            table.append((concurrency, rates["grpc"], rates["http"]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n`braintumor score` throughput, {len(items)} files per cell (one run)\n")
    print("| concurrency | gRPC img/s | HTTP img/s | gRPC / HTTP |")
    print("|---:|---:|---:|---:|")
    for concurrency, grpc_rate, http_rate in table:
        print(f"| {concurrency} | {grpc_rate:.1f} | {http_rate:.1f} | {grpc_rate / http_rate:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

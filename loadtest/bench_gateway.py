"""Gateway benchmark: `braintumor serve`'s HTTP /analyze versus a naive baseline, one run, table of ratios.

The baseline is how most BRISC projects serve: one web process holding the eager PyTorch model and answering each
request with ``model(x)`` (a sync Starlette handler on uvicorn, i.e. FastAPI's default). It does the same work per
request as our pipeline — same decoding, preprocessing, temperature-scaled outputs and postprocessing into the same
JSON with mask and heatmap PNGs — so the difference is the serving architecture (Triton's dynamic batching, ONNX
Runtime, the async gateway), not the payload.

    python loadtest/bench_gateway.py --checkpoint RUN/release.pt --data ../shared/data/brisc2025

Both servers are started here on free ports (ours with `braintumor serve`, unless --gateway points at a running
one), loaded in turn with the same real images at concurrency 1, 8 and 32 for --seconds each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()


# -- the baseline server (runs in its own process: `bench_gateway.py --baseline-server`) --------------------------
def baseline_app(checkpoint: str):
    import torch
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from braintumor.export.contract import FULL_OUTPUTS
    from braintumor.export.wrappers import build_graphs
    from braintumor.serving.postprocess import postprocess
    from braintumor.serving.wire import analysis_to_dict
    from braintumor.train.decode import decode_any
    from braintumor.train.preprocess import PreprocessConfig, preprocess
    from braintumor.train.trainer.checkpoint import load_model

    model, state = load_model(checkpoint)
    graph = build_graphs(model, state)["full"].eval()
    cfg = PreprocessConfig.from_dict(state["preprocess"])
    classes = state.get("classes") or ["glioma", "meningioma", "pituitary", "no_tumor"]

    def work(data: bytes) -> dict:
        decoded, _ = decode_any(data)
        image, geometry = preprocess(decoded.pixels, cfg)
        with torch.inference_mode():
            outs = graph(torch.from_numpy(image[None, None]))
        outputs = {name: out.numpy() for name, out in zip(FULL_OUTPUTS, outs)}
        result = postprocess(outputs, geometry, decoded, classes=classes,
                             refer_threshold=state.get("refer_threshold"))
        return analysis_to_dict(result, model=False)

    async def analyze(request: Request) -> JSONResponse:
        form = await request.form()
        data = await form["image"].read()
        # What FastAPI does with a plain `def` endpoint: the model call runs in the thread pool, one request each.
        return JSONResponse(await run_in_threadpool(work, data))

    async def ready(_request: Request) -> JSONResponse:
        return JSONResponse({"ready": True})

    return Starlette(routes=[Route("/analyze", analyze, methods=["POST"]), Route("/readyz", ready)])


def run_baseline_server(checkpoint: str, port: int) -> None:
    import uvicorn

    uvicorn.run(baseline_app(checkpoint), host="127.0.0.1", port=port, log_level="warning")


# -- load generation ----------------------------------------------------------------------------------------------
def load_payloads(data: str | None, count: int) -> list[bytes]:
    if data:
        paths = sorted(Path(data).glob("classification_task/*/*/*.jpg"))
        if not paths:
            raise SystemExit(f"no images under {data}/classification_task/<split>/<class>/*.jpg")
        return [p.read_bytes() for p in paths[:: max(1, len(paths) // count)][:count]]
    import io

    from PIL import Image

    from braintumor.train.naming import CLASSES
    from braintumor.train.synthetic import synthetic_slice

    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(synthetic_slice(CLASSES[i % 4], (256, 256), rng)[0]).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


async def load(url: str, payloads: list[bytes], concurrency: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds

    async def user(client: httpx.AsyncClient, k: int) -> None:
        nonlocal failures
        i = k
        while time.perf_counter() < deadline:
            body = payloads[i % len(payloads)]
            i += concurrency
            t0 = time.perf_counter()
            response = await client.post(url, files={"image": ("slice.jpg", body, "image/jpeg")})
            if response.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                failures += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await client.post(url, files={"image": ("slice.jpg", payloads[0], "image/jpeg")})  # warm
        start = time.perf_counter()
        await asyncio.gather(*(user(client, k) for k in range(concurrency)))
        elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    return {"rps": len(lat) / elapsed, "p50": statistics.median(lat) * 1000 if lat else float("nan"),
            "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000 if lat else float("nan"),
            "n": len(lat), "failures": failures}


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
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="the release checkpoint (the baseline serves it eagerly)")
    ap.add_argument("--model-repository", default="model_repository", help="what `braintumor serve` serves")
    ap.add_argument("--data", default=None, help="BRISC root for real request images (default: synthetic)")
    ap.add_argument("--images", type=int, default=64, help="distinct request images")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=15.0, help="load duration per server and concurrency")
    ap.add_argument("--settle", type=float, default=30.0,
                    help="seconds to wait after start-up before measuring: each front-door process warms its "
                         "explainers (imports lime/shap, compiles shap's numba kernels) in the background")
    ap.add_argument("--gateway", default=None, help="URL of a running gateway (else `braintumor serve` is started)")
    ap.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_server:
        run_baseline_server(args.checkpoint, args.port)
        return

    from braintumor.serving.triton_embedded import free_port

    payloads = load_payloads(args.data, args.images)
    procs = []
    try:
        if args.gateway:
            gateway = args.gateway.rstrip("/")
        else:
            ports = {k: free_port() for k in ("http", "grpc", "gm", "th", "tg", "tm")}
            cmd = [sys.executable, "-m", "braintumor.serving.cli", "serve", "--host", "127.0.0.1",
                   "--model-repository", args.model_repository, "--http-port", str(ports["http"]),
                   "--grpc-port", str(ports["grpc"]), "--grpc-metrics-port", str(ports["gm"]),
                   "--triton-http-port", str(ports["th"]), "--triton-grpc-port", str(ports["tg"]),
                   "--triton-metrics-port", str(ports["tm"])]
            procs.append(subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL))
            gateway = f"http://127.0.0.1:{ports['http']}"
            wait_ready(f"{gateway}/readyz", procs[-1])
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, str(HERE), "--baseline-server", "--port", str(port),
                                       "--checkpoint", args.checkpoint], start_new_session=True))
        baseline = f"http://127.0.0.1:{port}"
        wait_ready(f"{baseline}/readyz", procs[-1])

        time.sleep(args.settle)
        for url in (gateway, baseline):  # first requests: connection pools, lazy imports, allocator warm-up
            asyncio.run(load(f"{url}/analyze", payloads, max(args.concurrency), 5.0))
        rows = []
        for c in args.concurrency:
            ours = asyncio.run(load(f"{gateway}/analyze", payloads, c, args.seconds))
            base = asyncio.run(load(f"{baseline}/analyze", payloads, c, args.seconds))
            rows.append((c, ours, base))
    finally:
        for proc in reversed(procs):
            stop(proc)

    print(f"\n/analyze, {len(payloads)} real images, {args.seconds:g} s per cell, {os.cpu_count()} CPUs\n")
    print("| concurrency | ours img/s | baseline img/s | throughput ratio | ours p50 / p99 ms | baseline p50 / p99 ms "
          "| ours p99 <= baseline p50 | failures (ours/base) |")
    print("|---|---|---|---|---|---|---|---|")
    for c, o, b in rows:
        print(f"| {c} | {o['rps']:.1f} | {b['rps']:.1f} | {o['rps'] / b['rps']:.2f}x | {o['p50']:.0f} / {o['p99']:.0f} "
              f"| {b['p50']:.0f} / {b['p99']:.0f} | {'yes' if o['p99'] <= b['p50'] else 'no'} "
              f"| {o['failures']}/{b['failures']} |")


if __name__ == "__main__":
    main()

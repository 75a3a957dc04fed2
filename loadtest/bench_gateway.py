"""Gateway benchmark: the model alone, `braintumor serve` (HTTP /analyze and gRPC Analyze) and a naive baseline, side by
side in one run, with the ratios and the serving processes' CPU per image.

- **model alone**: ONNX Runtime in this process on pre-decoded, preprocessed uint8 input from the same model
  repository, with the session settings of the served python backend (intra-op threads = CPUs, no spinning), one
  batch of ``concurrency`` images (at most the model's max batch) after another: what the model costs with perfect
  batching and no serving at all. CUDA when this onnxruntime has it (``--device``).
- **ours**: `braintumor serve` on the same repository; HTTP /analyze (multipart) and gRPC Analyze, ``concurrency``
  closed-loop users each. Explanations are on demand, so no heatmap is asked unless ``--heatmap``. ``--backend``
  and ``--layout`` are serve's (Triton, or ONNX Runtime in the front doors); ``--mask-format rle`` asks for COCO
  run-length masks instead of PNGs.
- **baseline** (with ``--checkpoint``, ``bench_baseline.py``): how most BRISC projects serve: one web process holding the eager PyTorch model
  and answering each request with ``model(x)`` (a sync Starlette handler on uvicorn, i.e. FastAPI's default), doing
  the same decoding, preprocessing and postprocessing into the same JSON. Without a checkpoint it is left out.
- **Triton direct** (when the bench starts serve, or with ``--triton`` and BRAINTUMOR_TRITON_KEY): Triton's own gRPC
  inference fed the model-alone line's preprocessed tensors, one image a call: serving with no front door at all,
  the floor under any front end (nginx, Envoy, BentoML's descriptors) on this host.
- **``--nginx``**: the HTTP and gRPC lines go through nginx (``bench_nginx.py``: the deploy's HTTP front, and
  ``grpc_pass`` in front of the gRPC door), whose CPU is counted with the stack's.
- **rounds**: the lines of one concurrency take turns (``--rounds``, default 3, each ``seconds/rounds`` long) and
  each cell pools its rounds, so a slow spell of a shared host lands on all lines alike; the p50 gap to the model
  alone at concurrency 1 moved by ±2 ms from run to run here when each line ran in one block.
- **CPU per image**: user + system CPU seconds of each serving process (psutil ``cpu_times`` before and after each
  cell, summed by role: gateway, gRPC server, Triton with its python backend) divided by the images answered; the
  model alone's own CPU per image; and the stack's CPU over the model (front door + Triton - model alone), which
  compares the backends fairly (with ``--backend onnxruntime`` the front door's CPU includes the model).

    python loadtest/bench_gateway.py --model-repository model_repository --data ../shared/data/brisc2025 \
        [--checkpoint RUN/release.pt] [--seconds 15] [--rounds 3] [--concurrency 1 8 32] \
        [--backend onnxruntime] [--layout throughput] [--mask-format rle] [--nginx | --bento-io]

The load generator runs on the same host and takes CPU from the servers (not from the model-alone line, which runs
alone); its own CPU per image is printed too. It is kept lean for that reason: HTTP over aiohttp with each multipart
body built once (~0.7 ms of client CPU per request here; httpx, used before 2026-11-29, cost ~4.2 ms), gRPC over
grpc.aio (~0.7 ms). Run on an otherwise idle machine.

One job a module: this file (options, the run, the JSON), ``bench_load.py`` (model alone, load generators, pooling),
``bench_cpu.py`` (CPU meters, processes), ``bench_report.py`` (the tables), ``bench_baseline.py`` (the baseline),
``bench_nginx.py`` (nginx in front).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np

from braintumor.loadtest.bench_cpu import CpuMeter, Meters, RoleMeter, measured, settle, stop, wait_ready
from braintumor.loadtest.bench_load import ModelAlone, combine, combine_cpu, load_grpc, load_http, load_triton
from braintumor.loadtest.bench_report import report


# -- request images -----------------------------------------------------------------------------------------------
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


def main() -> None:
    from braintumor.clients.masks import MASK_FORMATS
    from braintumor.export.contract import LAYOUTS
    from braintumor.serving.settings import BACKENDS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repository", default="model_repository", help="what `braintumor serve` and the "
                    "model-alone line run")
    ap.add_argument("--model", default="brain_tumor", help="the full model's name in the repository")
    ap.add_argument("--checkpoint", default=None, help="the release checkpoint: the baseline serves it eagerly "
                    "(without it the baseline is left out)")
    ap.add_argument("--data", default=None, help="BRISC root for real request images (default: synthetic)")
    ap.add_argument("--images", type=int, default=64, help="distinct request images")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=15.0, help="load duration per cell")
    ap.add_argument("--rounds", type=int, default=3, help="the lines of one concurrency take turns this many times, "
                    "each for seconds/rounds, and each cell pools its rounds (1: one block per line, as before)")
    ap.add_argument("--settle", type=float, default=120.0,
                    help="at most this many seconds to wait after start-up for the servers to go quiet (under 5%% "
                         "of a core): each front-door process warms its explainers (imports lime/shap, compiles "
                         "shap's numba kernels) in the background, which would count as serving CPU")
    ap.add_argument("--heatmap", action="store_true", help="ask for the Grad-CAM heatmap on every request")
    ap.add_argument("--layout", choices=LAYOUTS, default="latency",
                    help="`braintumor serve --layout` of the server the bench starts")
    ap.add_argument("--mask-format", choices=MASK_FORMATS, default="png",
                    help="the mask format ours is asked for (the baseline always answers a PNG, as before)")
    ap.add_argument("--backend", choices=BACKENDS, default="triton",
                    help="`braintumor serve --backend` of the server the bench starts (onnxruntime: no Triton, the "
                         "model runs in each front door)")
    ap.add_argument("--no-grpc", action="store_true", help="leave out the gRPC Analyze column")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="model-alone execution provider (auto: CUDA when this onnxruntime has it)")
    ap.add_argument("--gateway", default=None, help="URL of a running gateway (else `braintumor serve` is started); "
                    "its serve process tree is found by port for the CPU columns")
    ap.add_argument("--grpc", default=None, help="HOST:PORT of the running gRPC API that goes with --gateway")
    ap.add_argument("--triton", default=None, help="HOST:PORT of the running server's Triton gRPC, for the Triton-direct "
                    "line with --gateway (its key from BRAINTUMOR_TRITON_KEY); the bench's own serve is measured so")
    ap.add_argument("--no-triton", action="store_true", help="leave out the Triton-direct line")
    ap.add_argument("--nginx", action="store_true", help="send the HTTP and gRPC lines through nginx (NGINX_BIN or "
                    "PATH): the deploy's HTTP front and grpc_pass in front of the gRPC door; its CPU counts")
    ap.add_argument("--bento-io", action="store_true", help="send the HTTP line to bench_bento_io.py instead: BentoML's "
                    "own I/O descriptors before the same pipeline and Triton, none of our HTTP code (bench's serve only)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the raw numbers as JSON")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.bento_io and (args.gateway or args.backend != "triton"):
        ap.error("--bento-io runs beside the serve the bench starts, with --backend triton")
    from braintumor.loadtest.memory import find_serve_pid
    from braintumor.serving.triton_embedded import free_port

    payloads = load_payloads(args.data, args.images)
    model = ModelAlone(args.model_repository, args.model, payloads, args.device)
    procs: list[subprocess.Popen] = []
    rows = []
    try:
        grpc_target = None if args.no_grpc else args.grpc
        triton_target, triton_key = args.triton, os.environ.get("BRAINTUMOR_TRITON_KEY", "")
        if args.gateway:
            gateway = args.gateway.rstrip("/")
            try:
                serve = CpuMeter(find_serve_pid(gateway))
            except (ValueError, ImportError) as exc:
                print(f"no CPU columns: {exc}", file=sys.stderr)
                serve = CpuMeter(None)
        else:
            ports = {k: free_port() for k in ("http", "grpc", "gm", "th", "tg", "tm")}
            cmd = [sys.executable, "-m", "braintumor.serving.cli", "serve", "--host", "127.0.0.1",
                   "--model-repository", args.model_repository, "--http-port", str(ports["http"]),
                   "--grpc-port", str(ports["grpc"]), "--grpc-metrics-port", str(ports["gm"]),
                   "--triton-http-port", str(ports["th"]), "--triton-grpc-port", str(ports["tg"]),
                   "--triton-metrics-port", str(ports["tm"]), "--layout", args.layout, "--backend", args.backend]
            triton_key = secrets.token_urlsafe(24)  # serve's Triton takes this key, so the Triton line can call it
            procs.append(subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                                          env={**os.environ, "BRAINTUMOR_TRITON_KEY": triton_key}))
            gateway = f"http://127.0.0.1:{ports['http']}"
            triton_target = f"127.0.0.1:{ports['tg']}" if args.backend == "triton" else None
            grpc_target = None if args.no_grpc else f"127.0.0.1:{ports['grpc']}"
            serve = CpuMeter(procs[-1].pid)
            wait_ready(f"{gateway}/readyz", procs[-1])
        if args.bento_io:
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bentoml", "serve", "braintumor.loadtest.bench_bento_io:DescriptorGateway",
                 "--host", "127.0.0.1", "--port", str(port)], start_new_session=True, stdout=subprocess.DEVNULL,
                env={**os.environ, "BRAINTUMOR_TRITON_URL": triton_target, "BRAINTUMOR_TRITON_KEY": triton_key}))
            gateway = f"http://127.0.0.1:{port}"
            wait_ready(f"{gateway}/readyz", procs[-1])
            serve = Meters(serve, RoleMeter(procs[-1].pid, "gateway"))
        if args.no_triton:
            triton_target = None
        if args.nginx:
            import tempfile

            from braintumor.loadtest.bench_nginx import front_doors

            front = front_doors(Path(tempfile.mkdtemp(prefix="bench-nginx-")), gateway, grpc_target)
            procs.append(front.proc)
            gateway, grpc_target = front.http_url, front.grpc_target
            serve = Meters(serve, RoleMeter(front.proc.pid, "nginx"))
        baseline, base_meter = None, CpuMeter(None)
        if args.checkpoint:
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "braintumor.loadtest.bench_baseline", "--port",
                                           str(port), "--checkpoint", args.checkpoint], start_new_session=True))
            baseline = f"http://127.0.0.1:{port}"
            base_meter = RoleMeter(procs[-1].pid, "gateway")  # one uvicorn process
            wait_ready(f"{baseline}/readyz", procs[-1])

        waited = settle([serve, base_meter], args.settle)
        print(f"servers quiet after {waited:.0f} s", file=sys.stderr)
        warm = min(5.0, args.seconds)
        for url in filter(None, (gateway, baseline)):  # first requests: connection pools, lazy imports, allocators
            asyncio.run(load_http(f"{url}/analyze", payloads, max(args.concurrency), warm, args.heatmap,
                                  args.mask_format if url == gateway else "png"))
        if grpc_target:
            asyncio.run(load_grpc(grpc_target, payloads, max(args.concurrency), warm, args.heatmap, args.mask_format))
        share = args.seconds / args.rounds
        for c in args.concurrency:
            # The lines take turns, `rounds` times, so a slow spell of the host (other tenants, a timer) falls on
            # every line alike instead of on whichever cell it met; the ratios and the p50 gaps compare like with like.
            lines: dict[str, list] = {"model": [], "triton": [], "http": [], "grpc": [], "base": []}
            for _ in range(args.rounds):
                lines["model"].append(model.run(c, share))
                if triton_target:
                    lines["triton"].append(measured(serve, lambda: asyncio.run(
                        load_triton(triton_target, triton_key, args.model, model.images, c, share))))
                lines["http"].append(measured(serve, lambda: asyncio.run(
                    load_http(f"{gateway}/analyze", payloads, c, share, args.heatmap, args.mask_format))))
                if grpc_target:
                    lines["grpc"].append(measured(serve, lambda: asyncio.run(
                        load_grpc(grpc_target, payloads, c, share, args.heatmap, args.mask_format))))
                if baseline:
                    lines["base"].append(measured(base_meter, lambda: asyncio.run(
                        load_http(f"{baseline}/analyze", payloads, c, share, args.heatmap))))
            row = {"c": c, "model": combine(lines["model"])}
            for key in ("triton", "http", "grpc", "base"):
                rounds = lines[key]
                row[key] = combine([result for result, _ in rounds]) if rounds else None
                row[f"{key}_cpu"] = combine_cpu(rounds) if rounds else None
            rows.append(row)
    finally:
        for proc in reversed(procs):
            stop(proc)

    print("\n" + report(rows, args, model.label, len(payloads)))
    if args.json:
        for row in rows:  # the raw latencies stay out of the file
            for cell in ("model", "triton", "http", "grpc", "base"):
                if row[cell] is not None:
                    row[cell].pop("latencies", None)
        Path(args.json).write_text(json.dumps({"model": model.label, "seconds": args.seconds, "rounds": args.rounds,
                                               "heatmap": args.heatmap, "layout": args.layout,
                                               "backend": args.backend, "mask_format": args.mask_format,
                                               "nginx": args.nginx,
                                               "cpus": os.cpu_count(), "rows": rows},
                                              indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()

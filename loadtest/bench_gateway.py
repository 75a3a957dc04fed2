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
- **baseline** (with ``--checkpoint``): how most BRISC projects serve: one web process holding the eager PyTorch model
  and answering each request with ``model(x)`` (a sync Starlette handler on uvicorn, i.e. FastAPI's default), doing
  the same decoding, preprocessing and postprocessing into the same JSON. Without a checkpoint it is left out.
- **rounds**: the lines of one concurrency take turns (``--rounds``, default 3, each ``seconds/rounds`` long) and
  each cell pools its rounds, so a slow spell of a shared host lands on all lines alike; the p50 gap to the model
  alone at concurrency 1 moved by ±2 ms from run to run here when each line ran in one block.
- **CPU per image**: user + system CPU seconds of each serving process (psutil ``cpu_times`` before and after each
  cell, summed by role: gateway, gRPC server, Triton with its python backend) divided by the images answered; the
  model alone's own CPU per image; and the stack's CPU over the model (front door + Triton - model alone), which
  compares the backends fairly (with ``--backend onnxruntime`` the front door's CPU includes the model).

    python loadtest/bench_gateway.py --model-repository model_repository --data ../shared/data/brisc2025 \
        [--checkpoint RUN/release.pt] [--seconds 15] [--rounds 3] [--concurrency 1 8 32] \
        [--backend onnxruntime] [--layout throughput] [--mask-format rle]

The load generator runs on the same host and takes CPU from the servers (not from the model-alone line, which runs
alone); its own CPU per image is printed too. It is kept lean for that reason: HTTP over aiohttp with each multipart
body built once (~0.7 ms of client CPU per request here; httpx, used before 2026-11-29, cost ~4.2 ms), gRPC over
grpc.aio (~0.7 ms). Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
CPU_ROLES = ("gateway", "grpc", "triton")


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
    from braintumor.serving.request import AnalyzeOptions
    from braintumor.serving.wire import analysis_to_dict
    from braintumor.train.decode import decode_any
    from braintumor.train.naming import CLASSES
    from braintumor.train.preprocess import PreprocessConfig, preprocess
    from braintumor.train.refer import ReferRules
    from braintumor.train.trainer.checkpoint import load_model

    model, state = load_model(checkpoint)
    graph = build_graphs(model, state)["full"].eval()
    cfg = PreprocessConfig.from_dict(state["preprocess"])
    classes = state.get("classes") or CLASSES

    def work(data: bytes, heatmap: bool) -> dict:
        decoded, _ = decode_any(data)
        image, geometry = preprocess(decoded.pixels, cfg)
        with torch.inference_mode():
            outs = graph(torch.from_numpy(image[None, None]))
        outputs = {name: out.numpy() for name, out in zip(FULL_OUTPUTS, outs)}
        result = postprocess(outputs, geometry, decoded, classes=classes,
                             rules=ReferRules(state.get("refer_threshold")), options=AnalyzeOptions(heatmap=heatmap))
        return analysis_to_dict(result, model=False)

    async def analyze(request: Request) -> JSONResponse:
        form = await request.form()
        data = await form["image"].read()
        heatmap = str(form.get("heatmap", "false")).lower() == "true"
        # What FastAPI does with a plain `def` endpoint: the model call runs in the thread pool, one request each.
        return JSONResponse(await run_in_threadpool(work, data, heatmap))

    async def ready(_request: Request) -> JSONResponse:
        return JSONResponse({"ready": True})

    return Starlette(routes=[Route("/analyze", analyze, methods=["POST"]), Route("/readyz", ready)])


def run_baseline_server(checkpoint: str, port: int) -> None:
    import uvicorn

    uvicorn.run(baseline_app(checkpoint), host="127.0.0.1", port=port, log_level="warning")


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


def _summary(latencies: list[float], images: int, elapsed: float, failures: int) -> dict:
    lat = sorted(latencies)
    return {"rps": images / elapsed if elapsed > 0 else 0.0,
            "p50": statistics.median(lat) * 1000 if lat else float("nan"),
            "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000 if lat else float("nan"),
            "n": images, "failures": failures, "elapsed": elapsed, "latencies": latencies}


def combine(rounds: list[dict]) -> dict:
    """One cell from its rounds: latencies pooled, images over the summed load time, failures added; the model-alone
    line's batch and CPU per image (weighted by images) kept."""
    out = _summary([x for r in rounds for x in r["latencies"]], sum(r["n"] for r in rounds),
                   sum(r["elapsed"] for r in rounds), sum(r["failures"] for r in rounds))
    if "batch" in rounds[0]:
        out["batch"] = rounds[0]["batch"]
    if "cpu_ms" in rounds[0]:
        out["cpu_ms"] = _weighted([r["cpu_ms"] for r in rounds], [r["n"] for r in rounds])
    return out


def combine_cpu(rounds: list[tuple[dict, dict[str, float]]]) -> dict[str, float]:
    """CPU ms per image by role over a cell's rounds (each round's per-image figure weighted by its images)."""
    images = [result["n"] for result, _ in rounds]
    return {role: _weighted([cpu[role] for _, cpu in rounds], images) for role in rounds[0][1]}


def _weighted(values: list[float], weights: list[int]) -> float:
    """Weighted mean; a round that answered nothing (its per-image figure is NaN) weighs nothing."""
    total = sum(w for w in weights if w)
    return sum(v * w for v, w in zip(values, weights) if w) / total if total else float("nan")


# -- the model alone ----------------------------------------------------------------------------------------------
class ModelAlone:
    """The served ONNX graph in this process, with the python backend's session settings, on pre-decoded input."""

    def __init__(self, repository: str, name: str, payloads: list[bytes], device: str) -> None:
        import onnxruntime as ort

        from braintumor.export import contract
        from braintumor.export.triton_config import latest_version
        from braintumor.serving.local_model import read_config, session_options, usable_cpus
        from braintumor.train.decode import decode_image
        from braintumor.train.preprocess import PreprocessConfig, preprocess

        try:
            version = latest_version(Path(repository) / name)
        except FileNotFoundError as exc:
            raise SystemExit(str(exc)) from None
        meta = json.loads((version / "metadata.json").read_text())
        cfg = PreprocessConfig.from_dict(meta["preprocess"])
        self.images = np.stack([preprocess(decode_image(d).pixels, cfg)[0] for d in payloads])[:, None]
        self.max_batch = int(read_config(Path(repository) / name / contract.CONFIG_FILE).get("max_batch_size") or 1)
        options = session_options(usable_cpus())  # the served rule: intra 0 = the usable CPUs
        cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        if device == "cuda" and not cuda:
            raise SystemExit("--device cuda: this onnxruntime has no CUDAExecutionProvider")
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda and device != "cpu"
                     else ["CPUExecutionProvider"])
        self.session = ort.InferenceSession(str(version / contract.ONNX_FILE), options, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.input = contract.INPUT_NAME
        self.outputs = list(contract.FULL_OUTPUTS)  # what the served model computes for every request
        self.label = f"{name}/{version.name} at {cfg.image_size} px on {self.provider}"

    def run(self, concurrency: int, seconds: float) -> dict:
        batch = min(concurrency, self.max_batch)
        n = len(self.images)
        batches = [np.ascontiguousarray(self.images[np.arange(i, i + batch) % n]) for i in range(0, n, batch)]
        self.session.run(self.outputs, {self.input: batches[0]})  # warm
        latencies, images, k = [], 0, 0
        cpu = time.process_time()  # this process: ONNX Runtime's threads included
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            self.session.run(self.outputs, {self.input: batches[k % len(batches)]})
            latencies.append(time.perf_counter() - t0)
            images += batch
            k += 1
        return _summary(latencies, images, time.perf_counter() - start, 0) | {
            "batch": batch, "cpu_ms": (time.process_time() - cpu) / images * 1000}


# -- load generation ----------------------------------------------------------------------------------------------
async def load_http(url: str, payloads: list[bytes], concurrency: int, seconds: float, heatmap: bool,
                    mask_format: str = "png") -> dict:
    """``concurrency`` closed-loop users POSTing multipart /analyze requests over aiohttp (C HTTP parser), with the
    bodies built once: the load generator shares the cores with the servers, and httpx's pure-Python stack cost
    ~4.2 ms of client CPU per request here against ~0.7 ms (measured, README), which the servers lost."""
    import aiohttp

    from braintumor.loadtest.payloads import Payload, multipart

    fields = {"heatmap": "true" if heatmap else "false", "mask_format": mask_format}
    bodies = [multipart(fields, Payload("slice.jpg", data, "image/jpeg")) for data in payloads]
    latencies: list[float] = []
    failures = 0

    async def post(session: aiohttp.ClientSession, k: int) -> bool:
        body, content_type = bodies[k % len(bodies)]
        async with session.post(url, data=body, headers={"content-type": content_type}) as response:
            await response.read()
            return response.status == 200

    async def user(session: aiohttp.ClientSession, k: int, deadline: float) -> None:
        nonlocal failures
        i = k
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            if await post(session, i):
                latencies.append(time.perf_counter() - t0)
            else:
                failures += 1
            i += concurrency

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await post(session, 0)  # warm
        start = time.perf_counter()
        await asyncio.gather(*(user(session, k, start + seconds) for k in range(concurrency)))
        elapsed = time.perf_counter() - start
    return _summary(latencies, len(latencies), elapsed, failures)


async def load_grpc(target: str, payloads: list[bytes], concurrency: int, seconds: float, heatmap: bool,
                    mask_format: str = "png") -> dict:
    import grpc

    from braintumor.clients.v1 import braintumor_pb2 as pb
    from braintumor.clients.v1 import braintumor_pb2_grpc as pb_grpc

    latencies: list[float] = []
    failures = 0

    async def user(stub, k: int, deadline: float) -> None:
        nonlocal failures
        i = k
        while time.perf_counter() < deadline:
            request = pb.AnalyzeRequest(image=payloads[i % len(payloads)], heatmap=heatmap, id=str(i),
                                        mask_format=mask_format)
            i += concurrency
            t0 = time.perf_counter()
            try:
                await stub.Analyze(request, timeout=120)
                latencies.append(time.perf_counter() - t0)
            except grpc.RpcError:
                failures += 1

    options = [("grpc.max_receive_message_length", 128 * 2**20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.BrainTumorStub(channel)
        await stub.Analyze(pb.AnalyzeRequest(image=payloads[0], heatmap=heatmap, mask_format=mask_format),
                           timeout=120)  # warm
        start = time.perf_counter()
        await asyncio.gather(*(user(stub, k, start + seconds) for k in range(concurrency)))
        elapsed = time.perf_counter() - start
    return _summary(latencies, len(latencies), elapsed, failures)


# -- CPU of the serving processes ---------------------------------------------------------------------------------
class CpuMeter:
    """User + system CPU seconds of a process tree by role (loadtest/memory.py ``role_of``), read before and after a
    cell; processes that appear or exit in between are counted from zero / dropped (none do while serving)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid

    def read(self) -> dict[int, tuple[str, float]]:
        import psutil

        from braintumor.loadtest.memory import role_of

        if self.pid is None:
            return {}
        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return {}
        out = {}
        for process in processes:
            try:
                times = process.cpu_times()
                out[process.pid] = (role_of(process.cmdline()), times.user + times.system)
            except psutil.Error:
                continue
        return out

    @staticmethod
    def per_image_ms(before: dict, after: dict, images: int) -> dict[str, float]:
        """CPU milliseconds per answered image, by role."""
        used = dict.fromkeys(CPU_ROLES, 0.0)
        for pid, (role, seconds) in after.items():
            if role in used:
                used[role] += seconds - before.get(pid, (role, 0.0))[1]
        return {role: (1000.0 * s / images if images else float("nan")) for role, s in used.items()}


def settle(meters: list[CpuMeter], most_s: float, quiet: float = 0.05) -> float:
    """Wait until every meter's process tree uses under ``quiet`` of a core over one second (the front doors warm
    their explainers in the background after readiness, which would count as serving CPU), at most ``most_s``."""
    start = time.monotonic()
    while time.monotonic() - start < most_s:
        before = [m.read() for m in meters]
        time.sleep(1.0)
        busy = [sum(s for _, s in m.read().values()) - sum(s for _, s in b.values()) for m, b in zip(meters, before)]
        if all(b < quiet for b in busy):
            break
    return time.monotonic() - start


def measured(meter: CpuMeter, run) -> tuple[dict, dict[str, float]]:
    """The cell's result and CPU ms per image by role, with ``client``: this process, the load generator, which
    shares the host with the servers (the model-alone line has no such neighbour)."""
    before, client = meter.read(), os.times()
    result = run()
    used = os.times()
    cpu = CpuMeter.per_image_ms(before, meter.read(), result["n"])
    spent = (used.user - client.user) + (used.system - client.system)
    cpu["client"] = 1000.0 * spent / result["n"] if result["n"] else float("nan")
    return result, cpu


# -- processes ----------------------------------------------------------------------------------------------------
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
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- report -------------------------------------------------------------------------------------------------------
def _ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or not b["rps"]:
        return "—"
    return f"{a['rps'] / b['rps']:.2f}x"


def _rps(r: dict | None) -> str:
    return "—" if r is None else f"{r['rps']:.1f}"


def _lat(r: dict | None) -> str:
    return "—" if r is None else f"{r['p50']:.0f} / {r['p99']:.0f}"


def _gap(r: dict | None, model: dict) -> str:
    """How much later than the model alone the median answer comes (ms): the p50 goal's measure."""
    return "—" if r is None else f"{r['p50'] - model['p50']:+.0f}"


def _cpu(c: dict | None, role: str) -> str:
    return "—" if not c or c.get(role) is None or np.isnan(c[role]) else f"{c[role]:.1f}"


def _overhead(c: dict | None, role: str, model: dict) -> str:
    """CPU per image the serving stack spends beyond the model itself: the front door plus Triton (whichever of the
    two runs the model) minus the model-alone line's CPU per image in the same run."""
    if not c or c.get(role) is None or np.isnan(c[role]) or "cpu_ms" not in model:
        return "—"
    return f"{c[role] + (c.get('triton') or 0.0) - model['cpu_ms']:.1f}"


def report(rows: list[dict], args, model_label: str, images: int) -> str:
    per_cell = f"{args.seconds:g} s per cell" + (f" in {args.rounds} alternating rounds" if args.rounds > 1 else "")
    lines = [f"/analyze, {images} real images, {per_cell}, {os.cpu_count()} CPUs, model {model_label}, "
             f"heatmap {'asked' if args.heatmap else 'not asked'}, mask {args.mask_format}, "
             f"layout {args.layout if not args.gateway else 'of the running server'}, "
             f"backend {args.backend if not args.gateway else 'of the running server'}"
             + (" (the model runs in the front doors: their CPU includes it)" if args.backend == "onnxruntime"
                else ""), ""]
    lines += ["| concurrency | model alone img/s (batch) | HTTP img/s | gRPC img/s | baseline img/s "
              "| HTTP / model | gRPC / model | HTTP / baseline | gRPC / baseline |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["model"]
        lines.append(f"| {r['c']} | {m['rps']:.1f} ({m['batch']}) | {_rps(r['http'])} | {_rps(r['grpc'])} "
                     f"| {_rps(r['base'])} | {_ratio(r['http'], m)} | {_ratio(r['grpc'], m)} "
                     f"| {_ratio(r['http'], r['base'])} | {_ratio(r['grpc'], r['base'])} |")
    lines += ["", "| concurrency | p50 / p99 ms: model alone (per batch) | HTTP | gRPC | baseline "
              "| p50 over the model alone, ms (HTTP / gRPC) "
              "| CPU ms/img: model alone | HTTP cell: gateway / Triton | gRPC cell: gRPC server / Triton "
              "| stack over the model (HTTP / gRPC) | baseline | load generator (HTTP / gRPC) "
              "| failures (HTTP/gRPC/base) |",
              "|---:|---|---|---|---|---|---:|---|---|---|---:|---|---|"]
    for r in rows:
        fails = "/".join("—" if r[k] is None else str(r[k]["failures"]) for k in ("http", "grpc", "base"))
        lines.append(f"| {r['c']} | {_lat(r['model'])} | {_lat(r['http'])} | {_lat(r['grpc'])} | {_lat(r['base'])} "
                     f"| {_gap(r['http'], r['model'])} / {_gap(r['grpc'], r['model'])} "
                     f"| {r['model'].get('cpu_ms', float('nan')):.1f} "
                     f"| {_cpu(r['http_cpu'], 'gateway')} / {_cpu(r['http_cpu'], 'triton')} "
                     f"| {_cpu(r['grpc_cpu'], 'grpc')} / {_cpu(r['grpc_cpu'], 'triton')} "
                     f"| {_overhead(r['http_cpu'], 'gateway', r['model'])} "
                     f"/ {_overhead(r['grpc_cpu'], 'grpc', r['model'])} "
                     f"| {_cpu(r['base_cpu'], 'gateway')} "
                     f"| {_cpu(r['http_cpu'], 'client')} / {_cpu(r['grpc_cpu'], 'client')} | {fails} |")
    return "\n".join(lines)


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
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the raw numbers as JSON")
    ap.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.baseline_server:
        run_baseline_server(args.checkpoint, args.port)
        return

    from braintumor.loadtest.memory import find_serve_pid
    from braintumor.serving.triton_embedded import free_port

    payloads = load_payloads(args.data, args.images)
    model = ModelAlone(args.model_repository, args.model, payloads, args.device)
    procs: list[subprocess.Popen] = []
    rows = []
    try:
        grpc_target = None if args.no_grpc else args.grpc
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
            procs.append(subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL))
            gateway = f"http://127.0.0.1:{ports['http']}"
            grpc_target = None if args.no_grpc else f"127.0.0.1:{ports['grpc']}"
            serve = CpuMeter(procs[-1].pid)
            wait_ready(f"{gateway}/readyz", procs[-1])
        baseline, base_meter = None, CpuMeter(None)
        if args.checkpoint:
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, str(HERE), "--baseline-server", "--port", str(port),
                                           "--checkpoint", args.checkpoint], start_new_session=True))
            baseline = f"http://127.0.0.1:{port}"
            base_meter = BaselineMeter(procs[-1].pid)
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
            lines: dict[str, list] = {"model": [], "http": [], "grpc": [], "base": []}
            for _ in range(args.rounds):
                lines["model"].append(model.run(c, share))
                lines["http"].append(measured(serve, lambda: asyncio.run(
                    load_http(f"{gateway}/analyze", payloads, c, share, args.heatmap, args.mask_format))))
                if grpc_target:
                    lines["grpc"].append(measured(serve, lambda: asyncio.run(
                        load_grpc(grpc_target, payloads, c, share, args.heatmap, args.mask_format))))
                if baseline:
                    lines["base"].append(measured(base_meter, lambda: asyncio.run(
                        load_http(f"{baseline}/analyze", payloads, c, share, args.heatmap))))
            row = {"c": c, "model": combine(lines["model"])}
            for key in ("http", "grpc", "base"):
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
            for cell in ("model", "http", "grpc", "base"):
                if row[cell] is not None:
                    row[cell].pop("latencies", None)
        Path(args.json).write_text(json.dumps({"model": model.label, "seconds": args.seconds, "rounds": args.rounds,
                                               "heatmap": args.heatmap, "layout": args.layout,
                                               "backend": args.backend, "mask_format": args.mask_format,
                                               "cpus": os.cpu_count(), "rows": rows},
                                              indent=2, default=float) + "\n")


class BaselineMeter(CpuMeter):
    """The baseline is one uvicorn process: all of its CPU counts as its 'gateway'."""

    def read(self) -> dict[int, tuple[str, float]]:
        return {pid: ("gateway", seconds) for pid, (_, seconds) in super().read().items()}


if __name__ == "__main__":
    main()

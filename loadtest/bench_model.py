"""Model-level inference benchmark: PyTorch eager (from the checkpoint) vs ONNX Runtime vs Triton HTTP vs Triton gRPC,
same preprocessed images, batch 1/8/32, one run; prints latency (p50 ms/batch), throughput (img/s) and ratios.

    python loadtest/bench_model.py --checkpoint RUN/best.pt --repository model_repository \
        --data ../shared/data/brisc2025

Backends are timed round-robin (one call each, repeated), so a background load shifts all of them alike. Triton is
started embedded on free ports unless --triton-http/--triton-grpc point at a running server. Before timing, the ONNX
Runtime thread settings are tuned on this host (intra/inter-op threads, sequential/parallel) and the best is used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from braintumor.export import contract

OUTPUTS = list(contract.FULL_OUTPUTS)


def load_images(metadata: dict, data: str | None, count: int) -> np.ndarray:
    """``count`` preprocessed uint8 slices (N, 1, H, W): real BRISC images, spread over every class, when ``data`` is given."""
    from braintumor.train.decode import decode_image
    from braintumor.train.preprocess import PreprocessConfig, preprocess

    cfg = PreprocessConfig.from_dict(metadata["preprocess"])
    if data:
        paths = sorted(Path(data).glob("classification_task/*/*/*.jpg"))
        if not paths:
            raise SystemExit(f"no images under {data}/classification_task/<split>/<class>/*.jpg")
        step = max(1, len(paths) // count)
        pixels = [decode_image(p).pixels for p in paths[::step][:count]]
    else:
        from braintumor.train.naming import CLASSES
        from braintumor.train.synthetic import synthetic_slice

        rng = np.random.default_rng(0)
        pixels = [synthetic_slice(CLASSES[i % len(CLASSES)], (240, 224), rng)[0] for i in range(count)]
    images = np.stack([preprocess(p, cfg)[0] for p in pixels])[:, None]
    return np.ascontiguousarray(np.resize(images, (count, *images.shape[1:])))  # repeat if fewer files than count


# -- backends: each is a callable batch -> {output name: array} -------------------------------------------------------
def eager_backend(checkpoint: str):
    import torch

    from braintumor.export.wrappers import build_graphs
    from braintumor.train.trainer.checkpoint import load_model

    model, state = load_model(checkpoint)
    graph = build_graphs(model, state)["full"].eval()

    def run(batch: np.ndarray) -> dict:
        with torch.inference_mode():
            outs = graph(torch.from_numpy(batch))
        return {name: out.numpy() for name, out in zip(OUTPUTS, outs)}

    return run


def tune_eager(run, images: np.ndarray, batch: int, seconds: float) -> tuple[int, list[tuple]]:
    """Fair to eager too: time torch's intra-op thread counts and keep the best (set for the rest of the run)."""
    import torch

    cpus = torch.get_num_threads()
    results = []
    for threads in sorted({1, cpus}):
        torch.set_num_threads(threads)
        results.append((threads, batch / _median_time(run, images[:batch], seconds)))
    best = max(results, key=lambda r: r[1])[0]
    torch.set_num_threads(best)
    return best, results


def _median_time(run, x: np.ndarray, seconds: float) -> float:
    run(x)
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ort_session(path: Path, intra: int, inter: int, parallel: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra
    options.inter_op_num_threads = inter
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_backend(session):
    def run(batch: np.ndarray) -> dict:
        return dict(zip(OUTPUTS, session.run(OUTPUTS, {contract.INPUT_NAME: batch})))

    return run


def tune_ort(path: Path, images: np.ndarray, batch: int, seconds: float) -> tuple[tuple, list[tuple]]:
    """Time a few thread settings at ``batch``; returns the best (intra, inter, parallel) and all results."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    grid = sorted({(1, 1, False), (cpus, 1, False), (cpus, 2, True), (0, 0, False), (max(1, cpus // 2), 2, True)})
    results = []
    x = images[:batch]
    for intra, inter, parallel in grid:
        run = ort_backend(ort_session(path, intra, inter, parallel))
        results.append(((intra, inter, parallel), batch / _median_time(run, x, seconds)))
    best = max(results, key=lambda r: r[1])[0]
    return best, results


def triton_http_backend(url: str, name: str):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url, connection_timeout=60, network_timeout=300)
    requested = [httpclient.InferRequestedOutput(o, binary_data=True) for o in OUTPUTS]

    def run(batch: np.ndarray) -> dict:
        inp = httpclient.InferInput(contract.INPUT_NAME, list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch, binary_data=True)
        result = client.infer(name, [inp], outputs=requested)
        return {o: result.as_numpy(o) for o in OUTPUTS}

    return run, client


def triton_grpc_backend(url: str, name: str):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    requested = [grpcclient.InferRequestedOutput(o) for o in OUTPUTS]

    def run(batch: np.ndarray) -> dict:
        inp = grpcclient.InferInput(contract.INPUT_NAME, list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch)
        result = client.infer(name, [inp], outputs=requested, client_timeout=300)
        return {o: result.as_numpy(o) for o in OUTPUTS}

    return run, client


# -- measurement ------------------------------------------------------------------------------------------------------
def measure(backends: dict, images: np.ndarray, batch: int, reps: int, warmup: int) -> dict[str, list[float]]:
    """Round-robin: each repetition calls every backend once on the same batch."""
    x = np.ascontiguousarray(images[:batch])
    for run in backends.values():
        for _ in range(warmup):
            run(x)
    times: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(reps):
        for name, run in backends.items():
            t0 = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - t0)
    return times


def triton_threads(config_file: Path) -> str:
    """The ONNX Runtime thread parameters the python backend reads from config.pbtxt (0 = CPUs / instances)."""
    text = config_file.read_text()
    found = {key: re.search(rf'key: "{key}" value {{ string_value: "(\d+)" }}', text)
             for key in (contract.PARAM_INTRA_OP_THREADS, contract.PARAM_INTER_OP_THREADS)}
    return ", ".join(f"{key}={m.group(1) if m else 'unset'}" for key, m in found.items())


def shadow_repository(repository: Path, name: str, intra: int, inter: int, into: Path) -> Path:
    """A copy of ``repository``'s model ``name`` whose config.pbtxt carries the given ORT threads; version folders
    are symlinks to the originals (their manifest still verifies). For timing Triton with the tuned threads."""
    src = Path(repository) / name
    dst = into / name
    dst.mkdir(parents=True)
    for child in src.iterdir():
        if child.name != contract.CONFIG_FILE:
            (dst / child.name).symlink_to(child.resolve(), target_is_directory=child.is_dir())
    text = (src / contract.CONFIG_FILE).read_text()
    for key, value in ((contract.PARAM_INTRA_OP_THREADS, intra), (contract.PARAM_INTER_OP_THREADS, inter)):
        text, n = re.subn(rf'(key: "{key}" value {{ string_value: ")\d+(")', rf"\g<1>{value}\g<2>", text)
        if n != 1:
            raise SystemExit(f"{src / contract.CONFIG_FILE}: no {key} parameter to set; use --triton-threads config")
    (dst / contract.CONFIG_FILE).write_text(text)
    return into


def max_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(a[o].astype(np.float64) - b[o]).max()) for o in OUTPUTS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint from `braintumor train` (for PyTorch eager)")
    p.add_argument("--repository", required=True, help="model repository from `braintumor export` (same checkpoint)")
    p.add_argument("--name", default=contract.DEFAULT_NAME, help="model name in the repository")
    p.add_argument("--version", default="1", help="version folder whose model.onnx ONNX Runtime runs")
    p.add_argument("--data", help="BRISC root: benchmark on real slices (default: synthetic slices)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes")
    p.add_argument("--images", type=int, default=192, help="images per backend and batch size (sets repetitions)")
    p.add_argument("--min-reps", type=int, default=6, help="at least this many timed calls per cell")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per backend and batch size")
    p.add_argument("--tune-seconds", type=float, default=1.5, help="seconds per ONNX Runtime thread setting")
    p.add_argument("--triton-http", help="host:port of a running Triton (default: start the embedded one)")
    p.add_argument("--triton-grpc", help="host:port of a running Triton's gRPC endpoint")
    p.add_argument("--triton-threads", choices=("tuned", "config"), default="tuned",
                   help="embedded Triton: run the python backend with the tuned ORT threads (a shadow config.pbtxt) "
                        "or with the repository's own")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    version_dir = Path(args.repository) / args.name / args.version
    metadata = json.loads((version_dir / contract.METADATA_FILE).read_text())
    images = load_images(metadata, args.data, max(args.batches))
    onnx_path = version_dir / contract.ONNX_FILE
    print(f"model {args.name} v{args.version}: input {images.shape[1:]} uint8, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    tune_batch = 8 if 8 in args.batches else max(args.batches)
    best, tuning = tune_ort(onnx_path, images, tune_batch, args.tune_seconds)
    print(f"\nONNX Runtime threads at batch {tune_batch} (intra, inter, mode -> img/s; 0 = ORT default):")
    for (intra, inter, parallel), ips in tuning:
        mark = "  <- used" if (intra, inter, parallel) == best else ""
        print(f"  intra={intra} inter={inter} {'parallel' if parallel else 'sequential':10s} {ips:8.1f}{mark}")

    import torch

    eager = eager_backend(args.checkpoint)
    torch_threads, torch_tuning = tune_eager(eager, images, tune_batch, args.tune_seconds)
    print(f"PyTorch eager threads at batch {tune_batch}: "
          + ", ".join(f"{t} -> {ips:.1f} img/s" for t, ips in torch_tuning) + f" (using {torch_threads})")
    eager_info = f"torch {torch.__version__}, {torch_threads} intra-op threads"
    backends = {"PyTorch eager": eager, "ONNX Runtime": ort_backend(ort_session(onnx_path, *best))}

    triton = None
    clients = []
    triton_info = triton_threads(Path(args.repository) / args.name / contract.CONFIG_FILE) + " (config.pbtxt)"
    stack = contextlib.ExitStack()
    try:
        if args.triton_http is None or args.triton_grpc is None:
            from braintumor.serving.triton_embedded import EmbeddedTriton, free_port

            repository = Path(args.repository)
            if args.triton_threads == "tuned" and not best[2]:  # the python backend runs ORT sequentially
                repository = shadow_repository(repository, args.name, best[0], best[1], Path(stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="bench-repo-"))))
                triton_info = f"intra_op_threads={best[0]}, inter_op_threads={best[1]} (tuned)"
            triton = EmbeddedTriton(repository, free_port(), free_port(), free_port(), address="127.0.0.1",
                                    load_models=[args.name], startup_timeout=180).start()
            http_url, grpc_url = triton.http_url, triton.grpc_url
        else:
            http_url, grpc_url = args.triton_http, args.triton_grpc
        run_http, http_client = triton_http_backend(http_url, args.name)
        run_grpc, grpc_client = triton_grpc_backend(grpc_url, args.name)
        clients = [http_client, grpc_client]
        backends.update({"Triton HTTP": run_http, "Triton gRPC": run_grpc})

        reference = eager(images[:4])
        diffs = {name: max_diff(run(images[:4]), reference) for name, run in backends.items() if name != "PyTorch eager"}
        print("\nsame inputs, max abs difference vs eager: "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), flush=True)

        rows = []
        for batch in args.batches:
            reps = max(args.min_reps, math.ceil(args.images / batch))
            times = measure(backends, images, batch, reps, args.warmup)
            for name, ts in times.items():
                p50 = statistics.median(ts)
                rows.append({"backend": name, "batch": batch, "reps": reps, "p50_ms": 1e3 * p50,
                             "p90_ms": 1e3 * float(np.percentile(ts, 90)), "img_per_s": batch / p50})
            print(f"  batch {batch}: {reps} calls per backend done", flush=True)
    finally:
        for client in clients:
            client.close()
        if triton is not None:
            triton.stop()
        stack.close()

    eager_ips = {r["batch"]: r["img_per_s"] for r in rows if r["backend"] == "PyTorch eager"}
    ort_ips = {r["batch"]: r["img_per_s"] for r in rows if r["backend"] == "ONNX Runtime"}
    print(f"\neager: {eager_info}; ONNX Runtime: intra={best[0]} inter={best[1]} "
          f"{'parallel' if best[2] else 'sequential'}; Triton: python backend running ONNX Runtime "
          f"({triton_info}), client on the same host\n")
    print("| backend | batch | p50 ms/batch | p90 ms/batch | img/s | vs eager | vs ORT |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        r["vs_eager"] = r["img_per_s"] / eager_ips[r["batch"]]
        r["vs_ort"] = r["img_per_s"] / ort_ips[r["batch"]]
        print(f"| {r['backend']} | {r['batch']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['img_per_s']:.1f} | "
              f"{r['vs_eager']:.2f}x | {r['vs_ort']:.2f}x |")
    goals = [f"ORT >= 1.5x eager at batch {b}: {'met' if ort_ips[b] >= 1.5 * eager_ips[b] else 'NOT met'} "
             f"({ort_ips[b] / eager_ips[b]:.2f}x)" for b in args.batches]
    goals += [f"Triton {r['backend'][7:]} within 10% of ORT at batch {r['batch']}: "
              f"{'met' if r['vs_ort'] >= 0.9 else 'NOT met'} ({r['vs_ort']:.2f}x)"
              for r in rows if r["backend"].startswith("Triton") and r["batch"] >= 8]
    print("\n" + "\n".join(goals))
    if args.json:
        Path(args.json).write_text(json.dumps({"ort_threads": best, "tuning": tuning, "torch_threads": torch_threads,
                                               "torch_tuning": torch_tuning, "rows": rows,
                                               "diffs": diffs}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What bench_gateway.py measures, line by line: the model alone (the served ONNX graph in this process) and the two
closed-loop load generators (HTTP /analyze over aiohttp, gRPC Analyze over grpc.aio, and straight into Triton with
the model-alone line's preprocessed tensors: the floor under any front door), each cell's summary and the pooling of a
cell's rounds."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import numpy as np


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
        from braintumor.export.model_contract import ModelContract
        from braintumor.export.triton_config import latest_version
        from braintumor.serving.local_model import read_config, session_options, usable_cpus
        from braintumor.train.decode import decode_image
        from braintumor.train.preprocess import preprocess

        try:
            version = latest_version(Path(repository) / name)
        except FileNotFoundError as exc:
            raise SystemExit(str(exc)) from None
        meta = json.loads((version / contract.METADATA_FILE).read_text())
        cfg = ModelContract.from_metadata(meta).preprocess
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


async def load_triton(target: str, key: str, model: str, images: np.ndarray, concurrency: int,
                      seconds: float) -> dict:
    """``concurrency`` closed-loop users sending Triton's own gRPC inference one preprocessed (1, 1, S, S) uint8 image
    at a time (as each front door does; Triton's dynamic batcher batches them), asking the outputs serving asks
    for, with the key of a restricted Triton: what serving costs with no front door at all (no decoding, no
    preprocessing, no answer), the floor under any HTTP or gRPC front end on this host."""
    import tritonclient.grpc.aio as triton
    from tritonclient.grpc import InferInput, InferRequestedOutput
    from tritonclient.utils import InferenceServerException

    from braintumor.export.contract import FULL_OUTPUTS, INPUT_NAME
    from braintumor.serving.settings import TRITON_GRPC_KEY_HEADER

    headers = {TRITON_GRPC_KEY_HEADER: key} if key else None
    latencies: list[float] = []
    failures = 0
    client = triton.InferenceServerClient(target)
    config = (await client.get_model_config(model, headers=headers, as_json=True))["config"]
    names = [o["name"] for o in config["output"] if o["name"] in FULL_OUTPUTS]

    async def infer(k: int) -> None:
        tensor = InferInput(INPUT_NAME, [1, *images.shape[1:]], "UINT8")
        tensor.set_data_from_numpy(np.ascontiguousarray(images[k % len(images)][None]))
        await client.infer(model, [tensor], outputs=[InferRequestedOutput(n) for n in names], headers=headers,
                           client_timeout=120)

    async def user(k: int, deadline: float) -> None:
        nonlocal failures
        i = k
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                await infer(i)
                latencies.append(time.perf_counter() - t0)
            except InferenceServerException:
                failures += 1
            i += concurrency

    try:
        await infer(0)  # warm
        start = time.perf_counter()
        await asyncio.gather(*(user(k, start + seconds) for k in range(concurrency)))
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
    return _summary(latencies, len(latencies), elapsed, failures)

"""The model in the front door's own process: ONNX Runtime behind the :class:`~.backend.ModelBackend` interface.

For single-host installs (`braintumor serve --backend onnxruntime`): the gateway and the gRPC server each load the
repository's ONNX graphs and run them themselves, so a request skips the gRPC hop to Triton, Triton's scheduler and
the python backend's shared-memory hop. Triton stays the default and the production path (GPU, TensorRT, many
front doors on one model server); README's performance section has what each costs.

Everything the pipeline reads comes from the same files Triton reads: ``config.pbtxt`` (or the layout's
``configs/<layout>.pbtxt``) parsed with Triton's own ``ModelConfig`` protobuf into the JSON form Triton's
model-config API returns, so :meth:`ModelInfo.from_config` is shared; the version folder's manifest is verified
before the graph is loaded (as the python backend does). Requests queued while the model is busy run as one batch
up to ``max_batch_size`` (Triton's dynamic batcher in miniature); ``instance_group`` count batches may run at once,
each with its share of the cores (the throughput layout).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..export.contract import CLASS_PROBS, ONNX_FILE, PARAM_INTER_OP_THREADS, PARAM_INTRA_OP_THREADS
from ..export.contract import classifier_name as classifier_of
from ..export.manifest import ManifestError, verify_manifest
from ..export.triton_config import latest_version, layout_file
from .errors import BadInput, DeadlineExceeded, UpstreamError
from .backend import ModelInfo, chunks

log = logging.getLogger("braintumor.serving")


class ModelLoadError(ValueError):
    """The repository cannot be served in-process; the message names the file and the fix."""


def read_config(path: Path) -> dict:
    """``config.pbtxt`` -> the JSON form of Triton's model-config API (proto field names), so serving reads the
    same dictionary whether Triton or this process serves the model."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    try:
        message = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no model config; serve a repository written by `braintumor export`") from None
    except text_format.ParseError as exc:
        raise ModelLoadError(f"{path}: not a Triton model config ({exc})") from None
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def newest_version(model_dir: Path, version: str = "") -> str:
    """The version folder to serve: ``version`` when given, else the newest numbered one (Triton's ``latest``)."""
    if version:
        if not (model_dir / version).is_dir():
            raise ModelLoadError(f"{model_dir / version}: no such model version")
        return version
    try:
        return latest_version(model_dir).name
    except FileNotFoundError as exc:
        raise ModelLoadError(str(exc)) from None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity), as the python backend counts them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def session_options(intra_op_threads: int, inter_op_threads: int = 1):
    """ONNX Runtime options of the served model: the python backend's (export/python_backend/model.py, which cannot
    import this), also used by bench_gateway's model-alone line. No busy-waiting between ops: on a small CPU host
    the spinning threads take cores from the front doors."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


# ONNX Runtime's CPU arena: when it gives memory back. The python backend's rule (export/python_backend/model.py,
# which cannot import this; tests/unit/test_memory_bounds.py checks the two copies of the class are equal).
ARENA_KEEP_BATCH = 8
SHRINK_AFTER_S = 1.0
SHRINK_ARENA = ("memory.enable_memory_arena_shrinkage", "cpu:0")


class ArenaShrink:
    """When ONNX Runtime's CPU arena gives memory back. It keeps the memory of the largest batch it ran, for good; a
    shrink after every large batch cost ~4 ms of CPU per image at batch 32 (measured), so none happens while large
    batches keep coming. The first batch of at most ARENA_KEEP_BATCH images once none larger has run for
    SHRINK_AFTER_S runs with ``options`` (RunOptions with SHRINK_ARENA): after a flood, the next ordinary request
    gives the flood's memory back."""

    def __init__(self, options):
        self.options = options
        self.grown_at = None  # when the last batch larger than ARENA_KEEP_BATCH ran; None: nothing to give back

    def run_options(self, batch, now):
        if batch > ARENA_KEEP_BATCH:
            self.grown_at = now
            return None
        if self.grown_at is not None and now - self.grown_at >= SHRINK_AFTER_S:
            self.grown_at = None
            return self.options
        return None


def arena_shrink() -> ArenaShrink:
    """An :class:`ArenaShrink` with its RunOptions."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry(*SHRINK_ARENA)
    return ArenaShrink(options)


def _instances(config: dict) -> tuple[int, bool]:
    """(instance count, wants a GPU) from the config's ``instance_group``."""
    groups = config.get("instance_group") or [{}]
    count = sum(int(g.get("count", 1)) for g in groups) or 1
    return count, any(g.get("kind") == "KIND_GPU" for g in groups)


def _parameter(config: dict, key: str, default: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", "") or default


def _locate(repository: Path, name: str, version: str, layout: str) -> tuple[dict, str]:
    """(config, version) of one model of the repository, its version folder verified against its manifest."""
    model_dir = repository / name
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir}: no such model in the repository; serve a repository written by "
                             "`braintumor export` (it holds the model and its _classifier twin)")
    config_path = model_dir / layout_file(layout)
    if not config_path.is_file() and layout != "latency":
        raise ModelLoadError(f"{config_path}: the {layout} layout's config is missing (exported before layouts); "
                             "re-export with `braintumor export`, or serve the latency layout")
    config = read_config(config_path)
    config.setdefault("name", name)
    version = newest_version(model_dir, version)
    version_dir = model_dir / version
    if not (version_dir / ONNX_FILE).is_file():
        raise ModelLoadError(f"{version_dir}: no {ONNX_FILE} (a TensorRT plan runs only in Triton); serve this "
                             "repository with --backend triton, or export an ONNX variant")
    try:
        verify_manifest(version_dir)
    except ManifestError as exc:
        raise ModelLoadError(f"refusing to load an unverified model: {exc}") from None
    return config, version


class _Batcher:
    """One ONNX Runtime session; whatever is queued while it runs goes in the next batch (up to ``max_batch``).

    ``instances`` batches may run at once, each in its own thread (ONNX Runtime releases the GIL); requests are
    never split, and callers send at most ``max_batch`` images per request (:func:`~.backend.chunks`).
    """

    def __init__(self, name: str, session, input_name: str, outputs: tuple[str, ...], max_batch: int,
                 instances: int) -> None:
        self.name = name
        self.session = session
        self.input_name = input_name
        self.outputs = outputs
        self.max_batch = max_batch
        self.arena = arena_shrink()
        self.instances = instances
        self._pending: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix=f"ort-{name}")
        self._running = 0  # batches in flight
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    async def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((images, future))
        self._start_next()
        return await future

    def _start_next(self) -> None:
        while self._pending and self._running < self.instances:
            batch: list[tuple[np.ndarray, asyncio.Future]] = []
            size = 0
            while self._pending and (not batch or size + len(self._pending[0][0]) <= self.max_batch):
                images, future = self._pending.popleft()
                if not future.done():  # a caller that gave up (deadline, disconnect) costs nothing
                    batch.append((images, future))
                    size += len(images)
            if batch:
                self._running += 1
                task = asyncio.get_running_loop().create_task(self._run_batch(batch), name=f"ort-{self.name}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, batch: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        try:
            images = batch[0][0] if len(batch) == 1 else np.concatenate([b for b, _ in batch])
            try:
                outs = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.session.run, list(self.outputs), {self.input_name: images},
                    self.arena.run_options(len(images), time.monotonic()))
            except Exception as exc:  # ORT raises its own types; these requests fail, the model stays up
                log.exception("in-process inference on %r failed", self.name)
                error = UpstreamError(f"inference on {self.name!r} failed in ONNX Runtime: {exc}")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                return
            start = 0
            for images_of, future in batch:
                stop = start + len(images_of)
                if not future.done():
                    future.set_result({n: out[start:stop] for n, out in zip(self.outputs, outs)})
                start = stop
        finally:
            self._running -= 1
            self._start_next()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class LocalModel:
    """A :class:`~.backend.ModelBackend` over ONNX Runtime in this process (TritonModel's twin).

    Loads ``<repository>/<model_name>`` and its classifier twin at construction (a missing file, a failed manifest
    or a TensorRT-only repository raise :class:`ModelLoadError` naming the file), so a front door that cannot serve
    never starts; ``ready`` is then always true.
    """

    def __init__(self, repository: str | os.PathLike, model_name: str, model_version: str = "",
                 timeout_s: float = 30.0, layout: str = "latency") -> None:
        self.repository = Path(repository)
        self.model_name = model_name
        self.classifier_name = classifier_of(model_name)
        self.timeout_s = timeout_s
        self.layout = layout
        self._full, config, version = self._load(model_name, model_version)
        self._classifier, _, _ = self._load(self.classifier_name, version)
        self._info = ModelInfo.from_config(config, version=version)

    @classmethod
    def check(cls, repository: str | os.PathLike, model_name: str, model_version: str = "",
              layout: str = "latency") -> str:
        """What construction checks, without loading a graph: both models' configs, ONNX files and manifests.
        Returns the version that would be served; :class:`ModelLoadError` naming the file otherwise."""
        _, version = _locate(Path(repository), model_name, model_version, layout)
        _locate(Path(repository), classifier_of(model_name), version, layout)
        return version

    def _load(self, name: str, version: str) -> tuple[_Batcher, dict, str]:
        import onnxruntime as ort

        config, version = _locate(self.repository, name, version, self.layout)
        version_dir = self.repository / name / version
        instances, gpu = _instances(config)
        # The python backend's rule: intra 0 = the usable CPUs shared among the instances.
        options = session_options(int(_parameter(config, PARAM_INTRA_OP_THREADS, "0"))
                                  or max(1, usable_cpus() // instances),
                                  int(_parameter(config, PARAM_INTER_OP_THREADS, "1")))
        providers = ["CPUExecutionProvider"]
        if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif gpu:
            log.warning("%s: KIND_GPU requested but this onnxruntime has no CUDA provider; running on CPU", name)
        session = ort.InferenceSession(str(version_dir / ONNX_FILE), options, providers=providers)

        outputs = tuple(o["name"] for o in config.get("output", []))
        missing = sorted(set(outputs) - {o.name for o in session.get_outputs()})
        if not outputs or missing:
            raise ModelLoadError(f"{self.repository / name}: config outputs {missing or '(none)'} are not in "
                                 f"{version_dir / ONNX_FILE}; re-export the model")
        input_name = config["input"][0]["name"]
        log.info("%s v%s in-process: ONNX Runtime %s on %s, %d instance(s), intra_op_threads=%d", name, version,
                 ort.__version__, session.get_providers()[0], instances, options.intra_op_num_threads)
        return (_Batcher(name, session, input_name, outputs, int(config.get("max_batch_size", 1)) or 1, instances),
                config, version)

    async def close(self) -> None:
        self._full.close()
        self._classifier.close()

    async def ready(self) -> bool:
        return True  # loaded at construction, or the front door did not start

    async def info(self) -> ModelInfo:
        return self._info

    def forget_info(self) -> None:
        """Nothing to forget: the model in this process cannot change under it."""

    async def infer(self, images: np.ndarray, info: ModelInfo | None = None) -> dict[str, np.ndarray]:
        """Full model on a (N, 1, S, S) uint8 batch -> {class_probs, mask_prob, cam[, ood_score]}."""
        parts = [await self._run(self._full, chunk) for chunk in chunks(images, self._full.max_batch)]
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in self._full.outputs}

    async def classify(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Classifier-only model on a (N, 1, S, S) uint8 batch -> (N, num_classes) calibrated probabilities."""
        size = min(batch_size or self._classifier.max_batch, self._classifier.max_batch)
        parts = await asyncio.gather(*(self._run(self._classifier, chunk) for chunk in chunks(images, size)))
        return np.concatenate([p[CLASS_PROBS] for p in parts])

    async def _run(self, batcher: _Batcher, images: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.ascontiguousarray(images, dtype=np.uint8)
        size = self._info.preprocess.image_size
        if batch.ndim != 4 or batch.shape[1:] != (1, size, size):
            raise BadInput(f"inference on {batcher.name!r}: input of shape {batch.shape}; the model takes "
                           f"(N, 1, {size}, {size}) uint8")
        try:
            return await asyncio.wait_for(batcher.run(batch), self.timeout_s)
        except asyncio.TimeoutError as exc:
            raise DeadlineExceeded(f"the in-process model did not answer {batcher.name!r} within "
                                   f"{self.timeout_s:g} s") from exc

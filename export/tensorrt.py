"""TensorRT FP16 engine (model.plan) from the exported ONNX, with an optimisation profile over the batch dimension,
and its parity against ONNX Runtime.

``tensorrt`` comes only from NVIDIA's package index and needs a CUDA GPU, so it is imported lazily; on a host
without either, every entry point raises TensorRTUnavailable saying what is missing. A plan is specific to the GPU
model and TensorRT version it was built with: build it on the serving host (or in NVIDIA's Triton container).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .contract import INPUT_NAME
from .onnx_export import OutputParity, compare, onnx_session, run_session

# FP16 engine vs FP32 ONNX Runtime. Probabilities and mask in [0, 1]: absolute bound; CAM values grow with the
# feature magnitudes (tens on a trained resnet18), so it also gets a relative term.
TRT_TOLERANCES: dict[str, tuple[float, float]] = {
    "class_probs": (2e-2, 0.0),
    "mask_prob": (2e-2, 0.0),
    "cam": (5e-2, 2e-2),
    "ood_score": (1e-1, 5e-2),  # a squared distance in the hundreds: relative; not yet measured on a GPU host
}
DEFAULT_WORKSPACE_BYTES = 2 << 30


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing on this host."""


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile: the engine accepts batches min..max and is tuned for opt."""

    min: int = 1
    opt: int = 8
    max: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    @classmethod
    def for_max_batch(cls, max_batch_size: int, opt: int | None = None) -> "BatchProfile":
        """The profile matching a Triton max_batch_size (the engine must accept every batch Triton may form)."""
        return cls(1, min(opt or 8, max_batch_size), max_batch_size)

    def shapes(self, image_size: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) input shapes for ``IOptimizationProfile.set_shape``."""
        return tuple((b, 1, image_size, image_size) for b in (self.min, self.opt, self.max))  # type: ignore[return-value]


def require_tensorrt():
    """Import tensorrt and check for a CUDA GPU; raise TensorRTUnavailable listing everything missing."""
    problems = []
    trt = None
    try:
        import tensorrt as trt
    except ImportError as exc:
        problems.append(f"the `tensorrt` Python package is not importable ({exc}); install it from NVIDIA's index "
                        "(pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12) or use NVIDIA's "
                        "Triton/TensorRT container")
    if not _cuda_available():
        problems.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    if problems:
        raise TensorRTUnavailable("cannot build a TensorRT engine on this host: " + "; ".join(problems)
                                  + ". Export with --backend python or --backend onnxruntime instead.")
    return trt


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def build_engine(onnx_path: str | Path, plan_path: str | Path, image_size: int, profile: BatchProfile, *,
                 fp16: bool = True, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> Path:
    """Parse the ONNX, build an engine with one optimisation profile for the ``image`` input, write ``plan_path``."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; 8.x needs the flag.
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(INPUT_NAME, *profile.shapes(image_size))
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    plan_path = Path(plan_path)
    plan_path.write_bytes(bytes(serialized))
    return plan_path


class EngineRunner:
    """Runs a plan on the GPU with torch CUDA buffers (TensorRT 10 tensor-address API)."""

    def __init__(self, plan_path: str | Path) -> None:
        trt = require_tensorrt()
        import torch

        self._trt, self._torch = trt, torch
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan_path}: TensorRT could not load the plan (built for another GPU or version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.max_batch = int(self.engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0])
        self.stream = torch.cuda.Stream()

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs for any number of images, run in chunks of the profile's max batch."""
        chunks = [self._run(images[i:i + self.max_batch]) for i in range(0, len(images), self.max_batch)]
        return {name: np.concatenate([c[name] for c in chunks]) for name in self.outputs}

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        torch, trt = self._torch, self._trt
        x = torch.from_numpy(np.ascontiguousarray(images)).cuda()
        self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
        self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
        buffers = {}
        for name in self.outputs:
            dtype = torch.from_numpy(np.empty(0, trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            buffers[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, buffers[name].data_ptr())
        torch.cuda.current_stream().synchronize()  # x's host-to-device copy ran on the default stream
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return {name: t.float().cpu().numpy() for name, t in buffers.items()}


def check_engine_parity(plan_path: str | Path, onnx_path: str | Path, images: np.ndarray,
                        tolerances: dict[str, tuple[float, float]] | None = None) -> list[OutputParity]:
    """The engine vs FP32 ONNX Runtime on the same preprocessed images, within FP16 tolerance."""
    runner = EngineRunner(plan_path)
    reference = run_session(onnx_session(onnx_path), images)
    return compare(runner(images), reference, tolerances=tolerances or TRT_TOLERANCES,
                   what="TensorRT FP16 vs ONNX Runtime")

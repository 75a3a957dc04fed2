"""ONNX export of the export graphs and the parity proof: onnx.checker -> ONNX Runtime -> assert_allclose vs PyTorch.

We use torch's TorchScript exporter (``dynamo=False``) on purpose: it writes one self-contained .onnx file (no
``.onnx.data`` that a copied repository can lose) and needs no onnxscript; these CNN graphs have no control flow
that would need torch.export. Dynamic batch dimension; H and W fixed from the checkpoint's preprocessing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..train.decode import decode_image
from ..train.preprocess import PreprocessConfig, preprocess
from .contract import INPUT_NAME

OPSET = 17
# FP32 ONNX Runtime (CPU) vs PyTorch eager: same maths, different kernels and summation order.
# Measured on resnet18 at 128 px: < 1e-6 absolute on every output.
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-3


class ParityError(AssertionError):
    """An exported graph disagrees with the reference beyond the stated tolerance."""


@dataclass(frozen=True)
class OutputParity:
    """Max errors of one output. ``max_rel`` is over elements whose reference magnitude exceeds ``atol`` (relative
    error of values that are numerically zero says nothing)."""

    name: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float

    def __str__(self) -> str:
        return (f"{self.name}: max abs {self.max_abs:.2e}, max rel {self.max_rel:.2e} "
                f"(atol {self.atol:g}, rtol {self.rtol:g})")


def export_onnx(graph: nn.Module, path: str | Path, image_size: int, *, opset: int = OPSET) -> Path:
    """Export ``graph`` (FullGraph or ClassifierGraph) with a uint8 (B, 1, H, W) input named ``image``."""
    if opset < 17:
        raise ValueError(f"opset {opset} is too old; 17 or newer is required")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = graph.eval()
    names = list(graph.output_names)
    example = torch.zeros(2, 1, image_size, image_size, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
        torch.onnx.export(
            graph, (example,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
            output_names=names, dynamic_axes={n: {0: "batch"} for n in [INPUT_NAME, *names]},
            do_constant_folding=True,
        )
    graph.eval()  # the exporter restores the pre-export mode; make sure nothing was left in training mode
    return path


def check_onnx(path: str | Path):
    """Run onnx.checker (full check, with shape inference) and return the loaded model."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 17:
        raise ValueError(f"{path}: opset {opset} < 17")
    return model


def onnx_session(path: str | Path, *, intra_op_threads: int = 0, inter_op_threads: int = 0):
    """A CPU ONNX Runtime session with full graph optimisation; 0 threads = ONNX Runtime's default."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(session, images: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT_NAME: images})))


@torch.no_grad()
def run_torch(graph: nn.Module, images: np.ndarray) -> dict[str, np.ndarray]:
    outputs = graph.eval()(torch.from_numpy(np.ascontiguousarray(images)))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return {name: out.numpy() for name, out in zip(graph.output_names, outputs)}


def parity_images(cfg: PreprocessConfig | dict, data: str | Path | None = None, count: int = 8,
                  seed: int = 0) -> np.ndarray:
    """``count`` preprocessed slices (N, 1, H, W) uint8: real ones from a BRISC-layout ``data`` root (the same number
    per class, deterministic), else synthetic slices through the same preprocessing."""
    if isinstance(cfg, dict):
        cfg = PreprocessConfig.from_dict(cfg)
    if data is not None:
        paths = _real_paths(data, count)
        pixels = [decode_image(p).pixels for p in paths]
    else:
        from ..train.naming import CLASSES
        from ..train.synthetic import synthetic_slice

        rng = np.random.default_rng(seed)
        pixels = [synthetic_slice(CLASSES[i % len(CLASSES)], (240, 224), rng)[0] for i in range(count)]
    return np.stack([preprocess(p, cfg)[0] for p in pixels])[:, None]


def _real_paths(data: str | Path, count: int) -> list[str]:
    from ..train.samples import build_index

    samples = sorted(build_index(data, skip_bad=True).samples, key=lambda s: s.key)
    if not samples:
        raise FileNotFoundError(f"{data}: no images found for the parity check")
    by_label: dict[str, list] = {}
    for s in samples:
        by_label.setdefault(s.label, []).append(s)
    picked: list[str] = []
    for i in range(max(len(v) for v in by_label.values())):  # round-robin over classes
        for label in sorted(by_label):
            if i < len(by_label[label]) and len(picked) < count:
                picked.append(by_label[label][i].image_path)
    return picked


def compare(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], *, atol: float = PARITY_ATOL,
            rtol: float = PARITY_RTOL, tolerances: dict[str, tuple[float, float]] | None = None,
            what: str = "ONNX Runtime vs PyTorch") -> list[OutputParity]:
    """assert_allclose on every reference output with ``(atol, rtol)`` (per output name via ``tolerances``); returns
    the max abs/rel errors. Raises ParityError naming the output."""
    report = []
    for name, ref in reference.items():
        a_tol, r_tol = (tolerances or {}).get(name, (atol, rtol))
        if name not in outputs:
            raise ParityError(f"{what}: output {name!r} is missing (got {sorted(outputs)})")
        out = outputs[name].astype(np.float64)
        ref64 = ref.astype(np.float64)
        if out.shape != ref.shape:
            raise ParityError(f"{what}: {name} has shape {out.shape}, expected {ref.shape}")
        diff = np.abs(out - ref64)
        big = np.abs(ref64) > a_tol
        rel = float((diff[big] / np.abs(ref64[big])).max()) if big.any() else 0.0
        try:
            np.testing.assert_allclose(out, ref64, atol=a_tol, rtol=r_tol, err_msg=f"{what}: {name}")
        except AssertionError as exc:
            raise ParityError(str(exc)) from None
        report.append(OutputParity(name, float(diff.max()), rel, a_tol, r_tol))
    return report


def check_parity(graph: nn.Module, onnx_path: str | Path, images: np.ndarray, *, atol: float = PARITY_ATOL,
                 rtol: float = PARITY_RTOL) -> list[OutputParity]:
    """onnx.checker, then ONNX Runtime on ``images`` (one batch) vs PyTorch eager."""
    check_onnx(onnx_path)
    outputs = run_session(onnx_session(onnx_path), images)
    return compare(outputs, run_torch(graph, images), atol=atol, rtol=rtol)

"""Checkpoint -> versioned Triton model repository: ``<name>`` (full graph) and ``<name>_classifier``.

Layout (one version shown)::

    <out>/<name>/config.pbtxt
    <out>/<name>/<version>/model.onnx      (+ model.py for the python variant, model.plan for tensorrt_plan)
    <out>/<name>/<version>/metadata.json   classes, preprocessing, temperature, tensors, parity, weights_storage
    <out>/<name>/<version>/manifest.json   sha256 of every file above

A version folder is written under a temporary name and renamed when complete, so a polling Triton never sees half
a model. Every graph proves parity before it is published.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .contract import (
    DEFAULT_NAME,
    METADATA_FILE,
    ONNX_FILE,
    PLAN_FILE,
    PYTHON_FILE,
    check_model_name,
    classifier_name,
    input_spec,
    output_specs,
)
from ..train.hashing import file_sha256
from .manifest import write_manifest
from .onnx_export import (
    OPSET,
    OutputParity,
    check_onnx,
    check_parity,
    compare,
    export_onnx,
    onnx_session,
    parity_images,
    run_session,
    run_torch,
)
from .model_contract import ModelContract
from .triton_config import TritonOptions, layout_file, metadata_configs

PYTHON_BACKEND_MODEL = Path(__file__).parent / "python_backend" / "model.py"
# CLI spelling -> Triton variant.
BACKENDS = {"python": "python", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt_plan", "tensorrt_plan": "tensorrt_plan"}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportOptions:
    name: str = DEFAULT_NAME
    version: int | None = None  # None: one above the highest existing version of either model
    backend: str = "python"  # python | onnxruntime | tensorrt (tensorrt_plan)
    triton: TritonOptions = field(default_factory=TritonOptions)
    opset: int = OPSET
    parity_data: str | Path | None = None  # BRISC-layout root for real parity images; None: synthetic slices
    parity_count: int = 8
    trt_opt_batch: int = 8
    # Store weights as float16 behind Cast nodes (fp32 compute): halves model.onnx; parity uses fp16 tolerances.
    weights_fp16: bool = False

    @property
    def variant(self) -> str:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of python, onnxruntime, tensorrt")
        return BACKENDS[self.backend]


@dataclass
class ModelExport:
    """One published model version and its measured parity."""

    name: str
    version: int
    folder: Path
    sizes: dict[str, int]  # file name -> bytes
    parity: list[OutputParity]
    tensorrt_parity: list[OutputParity] = field(default_factory=list)


def export_steps(options: ExportOptions) -> int:
    """How many times ``export_repository`` calls ``progress`` (for a progress bar's total)."""
    per_model = 3 + (2 if options.variant == "tensorrt_plan" else 0)
    return 2 + 2 * per_model


def next_version(out: str | Path, names: list[str]) -> int:
    versions = [int(p.name) for n in names if (Path(out) / n).is_dir()
                for p in (Path(out) / n).iterdir() if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def export_repository(checkpoint: str | Path, out: str | Path, options: ExportOptions | None = None,
                      progress: Progress | None = None) -> list[ModelExport]:
    """Export both graphs of ``checkpoint`` into the repository ``out``, proving parity; returns what was published."""
    from ..train.trainer.checkpoint import load_model
    from .wrappers import build_graphs, cam_size

    options = options or ExportOptions()
    variant = options.variant
    step = progress or (lambda _label: None)
    out = Path(out)
    name = check_model_name(options.name)
    names = [name, classifier_name(name)]
    version = options.version if options.version is not None else next_version(out, names)
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    for n in names:
        if (out / n / str(version)).exists():
            raise FileExistsError(f"{out / n / str(version)} already exists; pass another --version or omit it to "
                                  "take the next number")
    if variant == "tensorrt_plan":
        from .tensorrt import require_tensorrt

        require_tensorrt()  # fail before minutes of work, with the reason

    step("load checkpoint")
    model, state = load_model(checkpoint)
    image_size = int(state["preprocess"]["image_size"])
    grid = cam_size(model, image_size)
    deployed = ModelContract.from_checkpoint(state, cam_size=grid)  # written to metadata.json and config.pbtxt
    classes = list(deployed.classes)
    step("preprocess parity images")
    images = parity_images(state["preprocess"], options.parity_data, options.parity_count)
    graphs = build_graphs(model, state)
    provenance = {
        "checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": file_sha256(checkpoint),
        "epoch": state.get("epoch"), "validation_keys": sorted(state.get("val_keys") or []),
        "calibration": state.get("calibration"), "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parity_images": str(options.parity_data) if options.parity_data else "synthetic",
        **_versions(),
    }

    published = []
    out.mkdir(parents=True, exist_ok=True)
    for model_name, graph_key in zip(names, ("full", "classifier")):
        classifier = graph_key == "classifier"
        final = out / model_name / str(version)
        tmp = out / model_name / f".{version}.tmp-{os.getpid()}"  # not a number: Triton ignores it
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            step(f"{model_name}: export ONNX")
            onnx_path = export_onnx(graphs[graph_key], tmp / ONNX_FILE, image_size, opset=options.opset)
            step(f"{model_name}: parity ONNX Runtime vs PyTorch")
            # The fp32 graph proves the exporter at the tight tolerance first, so the fp16 one cannot hide a bug.
            parity = check_parity(graphs[graph_key], onnx_path, images)
            fp32_parity: list[OutputParity] = []
            if options.weights_fp16:
                fp32_parity, parity = parity, _fp16_parity(graphs[graph_key], onnx_path, images)
            trt_parity: list[OutputParity] = []
            if variant == "tensorrt_plan":
                from .tensorrt import BatchProfile, build_engine, check_engine_parity

                step(f"{model_name}: build TensorRT FP16 engine")
                profile = BatchProfile.for_max_batch(options.triton.max_batch_size, options.trt_opt_batch)
                build_engine(onnx_path, tmp / PLAN_FILE, image_size, profile)
                step(f"{model_name}: parity TensorRT vs ONNX Runtime")
                trt_parity = check_engine_parity(tmp / PLAN_FILE, onnx_path, images)
            step(f"{model_name}: write version {version}")
            if variant == "python":
                shutil.copyfile(PYTHON_BACKEND_MODEL, tmp / PYTHON_FILE)
            metadata = {
                "name": model_name, "version": version, "variant": variant, **deployed.to_metadata(),
                "init_weights": state.get("init_weights"),
                "inputs": [asdict(input_spec(image_size))],
                "outputs": [asdict(s) for s in output_specs(image_size, len(classes), grid, classifier=classifier,
                                                            ood=deployed.ood_threshold is not None)],
                "weights_storage": "float16" if options.weights_fp16 else "float32",
                "parity": {"onnxruntime_vs_pytorch": [asdict(p) for p in parity],
                           "tensorrt_vs_onnxruntime": [asdict(p) for p in trt_parity],
                           **({"onnxruntime_fp32_weights_vs_pytorch": [asdict(p) for p in fp32_parity]}
                              if options.weights_fp16 else {})},
                **provenance,
            }
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
            write_manifest(tmp, {"name": model_name, "version": version})
            # config.pbtxt (latency) and configs/throughput.pbtxt, from the metadata just written (one generator)
            for layout, config in metadata_configs(metadata, options.triton).items():
                _write_text_atomic(out / model_name / layout_file(layout), config)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        sizes = {p.name: p.stat().st_size for p in sorted(final.iterdir()) if p.is_file()}
        published.append(ModelExport(model_name, version, final, sizes, parity, trt_parity))
    return published


def _fp16_parity(graph, onnx_path: Path, images) -> list[OutputParity]:
    """Rewrite ``onnx_path`` with fp16-stored weights, then checker -> ONNX Runtime -> PyTorch at fp16 tolerances."""
    from .fp16_storage import FP16_PARITY_TOLERANCES, store_weights_fp16

    store_weights_fp16(onnx_path)
    check_onnx(onnx_path)
    outputs = run_session(onnx_session(onnx_path), images)
    return compare(outputs, run_torch(graph, images), tolerances=FP16_PARITY_TOLERANCES,
                   what="ONNX Runtime (fp16-stored weights) vs PyTorch")


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


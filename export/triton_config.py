"""config.pbtxt generated from the tensor contract (names, dtypes, dims): never hand-kept next to the export.

Torch-free. Tests parse the text back with Triton's own ModelConfig protobuf (tritonclient.grpc.model_config_pb2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from .contract import (
    CLASSIFIER_OUTPUTS,
    CONFIG_FILE,
    CONFIGS_DIR,
    INPUT_NAME,
    LAYOUTS,
    METADATA_FILE,
    OOD_SCORE,
    ONNX_FILE,
    PARAM_INTER_OP_THREADS,
    PARAM_INTRA_OP_THREADS,
    PLAN_FILE,
    THROUGHPUT_INSTANCES,
    VARIANTS,
    TensorSpec,
    check_model_name,
    input_spec,
    output_specs,
)
from .model_contract import ModelContract

_TRITON_DTYPE = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}
# How Triton runs each variant: ("backend", name) or ("platform", name), and the file it loads.
_RUNTIME = {
    "python": ("backend", "python", None),  # model.py running ONNX Runtime inside Triton (the embedded default)
    "onnxruntime": ("platform", "onnxruntime_onnx", ONNX_FILE),
    "tensorrt_plan": ("platform", "tensorrt_plan", PLAN_FILE),
}
KINDS = ("KIND_CPU", "KIND_GPU")
WARMUPS = ("zero", "random", "none")


@dataclass(frozen=True)
class TritonOptions:
    """Serving knobs of one model. Defaults suit the 2-core CPU host; raise instances/batch on a GPU host."""

    max_batch_size: int = 32
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_queue_delay_us: int = 1000
    instance_count: int = 1
    instance_kind: str | None = None  # None: KIND_GPU for tensorrt_plan, KIND_CPU otherwise
    num_versions: int = 1  # version_policy latest { num_versions }: older versions stay on disk, unloaded
    warmup: str = "zero"  # zero | random | none: one batch-1 request at load time
    intra_op_threads: int = 0  # python backend's ONNX Runtime; 0 = usable CPUs / instances
    inter_op_threads: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ValueError(f"preferred batch sizes {bad} are outside 1..max_batch_size ({self.max_batch_size})")
        if self.max_queue_delay_us < 0 or self.instance_count < 1 or self.num_versions < 1:
            raise ValueError("max_queue_delay_us must be >= 0, instance_count and num_versions >= 1")
        if self.instance_kind is not None and self.instance_kind not in KINDS:
            raise ValueError(f"instance_kind {self.instance_kind!r} is not one of {KINDS}")
        if self.warmup not in WARMUPS:
            raise ValueError(f"warmup {self.warmup!r} is not one of {WARMUPS}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError("ONNX Runtime thread counts must be >= 0")

    def kind_for(self, variant: str) -> str:
        return self.instance_kind or ("KIND_GPU" if variant == "tensorrt_plan" else "KIND_CPU")


def layout_options(options: TritonOptions, layout: str) -> TritonOptions:
    """The options of one serving layout (:data:`~.contract.LAYOUTS`): ``latency`` is ``options`` as given (one
    instance by default, every core on each request); ``throughput`` runs :data:`~.contract.THROUGHPUT_INSTANCES`
    instances (the python backend gives each its share of the cores, so a batch never waits for a thread another
    process has taken; measured in README: more images per second under load, a slower single request)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    if layout == "latency":
        return options
    return replace(options, instance_count=max(options.instance_count, THROUGHPUT_INSTANCES))


def latest_version(model_dir: Path) -> Path:
    """The newest numbered version folder of ``<repository>/<model>`` (what Triton's ``latest`` policy serves)."""
    versions = sorted((int(p.name), p) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise FileNotFoundError(f"{model_dir}: no numbered version folder; export one with `braintumor export`")
    return versions[-1][1]


def layout_file(layout: str) -> str:
    """Where a layout's config lives inside ``<repository>/<model>/``."""
    return CONFIG_FILE if layout == "latency" else f"{CONFIGS_DIR}/{layout}.pbtxt"


def model_config(name: str, variant: str, image_size: int, num_classes: int, cam_size: int, *,
                 classifier: bool = False, options: TritonOptions | None = None,
                 parameters: dict[str, str] | None = None, ood: bool = False) -> str:
    """The config.pbtxt text of the full model or, with ``classifier=True``, of ``<name>_classifier``; ``ood``: the
    full graph has the ``ood_score`` output."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {VARIANTS}")
    options = options or TritonOptions()
    key, runtime, filename = _RUNTIME[variant]
    params = dict(parameters or {})
    if variant == "python":
        params.setdefault(PARAM_INTRA_OP_THREADS, str(options.intra_op_threads))
        params.setdefault(PARAM_INTER_OP_THREADS, str(options.inter_op_threads))
    image = input_spec(image_size)
    lines = [f"name: {_q(check_model_name(name))}", f"{key}: {_q(runtime)}"]
    if filename:
        lines.append(f"default_model_filename: {_q(filename)}")
    lines += [
        f"max_batch_size: {options.max_batch_size}",
        f"version_policy: {{ latest: {{ num_versions: {options.num_versions} }} }}",
        "input [",
        _tensor(image),
        "]",
        "output [",
        ",\n".join(_tensor(spec) for spec in output_specs(image_size, num_classes, cam_size, classifier=classifier,
                                                            ood=ood)),
        "]",
        "dynamic_batching {",
        *([f"  preferred_batch_size: [ {', '.join(str(b) for b in options.preferred_batch_sizes)} ]"]
          if options.preferred_batch_sizes else []),
        f"  max_queue_delay_microseconds: {options.max_queue_delay_us}",
        "}",
        f"instance_group [ {{ count: {options.instance_count} kind: {options.kind_for(variant)} }} ]",
    ]
    if options.warmup != "none":
        lines += [
            "model_warmup [ {",
            f"  name: {_q(options.warmup + '_image')}",
            "  batch_size: 1",
            f"  inputs {{ key: {_q(INPUT_NAME)} value {{ data_type: {_TRITON_DTYPE[image.dtype]} "
            f"dims: [ {', '.join(map(str, image.dims))} ] {options.warmup}_data: true }} }}",
            "} ]",
        ]
    for k in sorted(params):
        lines.append(f"parameters {{ key: {_q(k)} value {{ string_value: {_q(params[k])} }} }}")
    return "\n".join(lines) + "\n"


def _tensor(spec: TensorSpec) -> str:
    return (f"  {{ name: {_q(spec.name)} data_type: {_TRITON_DTYPE[spec.dtype]} "
            f"dims: [ {', '.join(map(str, spec.dims))} ] }}")


def _q(text: str) -> str:
    """A protobuf text-format string literal (C-style escapes)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def metadata_configs(meta: dict, options: TritonOptions | None = None) -> dict[str, str]:
    """Every layout's config text of one exported model, from its metadata.json content (the export writes its configs
    through this, so a repository's files can be regenerated and checked from the metadata alone). The classifier
    graph is told by its outputs, not its name."""
    model = ModelContract.from_metadata(meta)
    outputs = [o["name"] for o in meta["outputs"]]
    return {layout: model_config(meta["name"], meta["variant"], model.image_size, len(model.classes),
                                 model.cam_size, classifier=outputs == list(CLASSIFIER_OUTPUTS),
                                 options=layout_options(options or TritonOptions(), layout),
                                 parameters=model.to_parameters(), ood=OOD_SCORE in outputs)
            for layout in LAYOUTS}


def layout_configs(model_dir: str | Path, options: TritonOptions | None = None) -> dict[str, str]:
    """Every layout's config text of one exported model folder, regenerated from its newest version's metadata.json
    with ``options`` (the export defaults unless given): what ``braintumor export`` wrote, so a test can prove the
    files on disk came from this generator, and a repository exported before layouts can get its missing ones."""
    model_dir = Path(model_dir)
    versions = [v for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit()]
    if not versions:
        raise FileNotFoundError(f"{model_dir} has no numbered version folder")
    return metadata_configs(json.loads((max(versions, key=lambda v: int(v.name)) / METADATA_FILE).read_text()),
                            options)

"""The tensor and wire contract of exported models: names, dtypes and shapes shared by export, config.pbtxt and serving.

Torch-free on purpose: serving and clients import these constants, never a second copy of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_NAME = "brain_tumor"
CLASSIFIER_SUFFIX = "_classifier"

# Input: the preprocessed greyscale slice (train.preprocess.preprocess) as uint8, normalised inside the graph.
INPUT_NAME = "image"
INPUT_DTYPE = "uint8"  # numpy dtype name at the Triton boundary; the ONNX graph takes the same

CLASS_PROBS = "class_probs"  # (B, num_classes) softmax(logits / temperature)
MASK_PROB = "mask_prob"  # (B, 1, H, W) sigmoid of the mask logits
CAM = "cam"  # (B, num_classes, h, w) bias-free class activation maps (Grad-CAM up to a positive factor)
# (B, 1) min over classes of the Mahalanobis distance of the class head's pooled feature (train/ood.py). (B, 1), not
# (B,): a batched Triton model describes each item with at least one dim, so no reshape rule is needed anywhere.
OOD_SCORE = "ood_score"
OUTPUT_DTYPE = "float32"

FULL_OUTPUTS: tuple[str, ...] = (CLASS_PROBS, MASK_PROB, CAM, OOD_SCORE)
# The full graph of a checkpoint without a fitted OOD score (and of every model exported before it existed).
BASE_OUTPUTS: tuple[str, ...] = FULL_OUTPUTS[:3]
CLASSIFIER_OUTPUTS: tuple[str, ...] = (CLASS_PROBS,)

# File names inside a version folder. Triton's default file names per backend.
ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"
PYTHON_FILE = "model.py"
METADATA_FILE = "metadata.json"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.pbtxt"
# Serving layouts: config.pbtxt is the latency layout (one instance using every core); the throughput layout is
# Triton's custom configuration <model>/configs/throughput.pbtxt, chosen at start with --model-config-name.
CONFIGS_DIR = "configs"
LAYOUTS: tuple[str, ...] = ("latency", "throughput")
THROUGHPUT_INSTANCES = 2  # model instances of the throughput layout (the python backend splits the cores among them)

# Model variants (how Triton runs the graph) and the file each one serves.
VARIANTS: tuple[str, ...] = ("python", "onnxruntime", "tensorrt_plan")
VARIANT_FILE = {"python": PYTHON_FILE, "onnxruntime": ONNX_FILE, "tensorrt_plan": PLAN_FILE}

# Keys of the string parameters in config.pbtxt (values are JSON), read back by serving and the python backend.
PARAM_CLASSES = "classes"
PARAM_PREPROCESS = "preprocess"
PARAM_TEMPERATURE = "temperature"
PARAM_REFER_THRESHOLD = "refer_threshold"
PARAM_CAM_SIZE = "cam_size"
PARAM_DISAGREE_MIN_AREA = "disagree_min_area"  # model-input pixels; no_tumor with a larger mask is referred
PARAM_OOD_THRESHOLD = "ood_threshold"  # an ood_score above it is referred as out of distribution
PARAM_INTRA_OP_THREADS = "intra_op_threads"  # python backend: ONNX Runtime threads; 0 = CPUs / instances
PARAM_INTER_OP_THREADS = "inter_op_threads"

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def classifier_name(name: str = DEFAULT_NAME) -> str:
    """The classifier-only graph's model name, used by the perturbation explainers."""
    return f"{name}{CLASSIFIER_SUFFIX}"


def check_model_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"model name {name!r} must be letters, digits, '_', '.', '-' (a Triton model folder name)")
    return name


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model, without the batch dimension (Triton's ``dims`` with max_batch_size > 0)."""

    name: str
    dtype: str  # numpy dtype name
    dims: tuple[int, ...]

    def batched(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.dims)


def input_spec(image_size: int) -> TensorSpec:
    return TensorSpec(INPUT_NAME, INPUT_DTYPE, (1, image_size, image_size))


def output_specs(image_size: int, num_classes: int, cam_size: int, *, classifier: bool = False,
                 ood: bool = True) -> tuple[TensorSpec, ...]:
    """Outputs in graph order: (class_probs, mask_prob, cam, ood_score) — without ood_score when ``ood`` is False (no
    fitted OOD score) — or (class_probs,) for the classifier graph."""
    specs = (
        TensorSpec(CLASS_PROBS, OUTPUT_DTYPE, (num_classes,)),
        TensorSpec(MASK_PROB, OUTPUT_DTYPE, (1, image_size, image_size)),
        TensorSpec(CAM, OUTPUT_DTYPE, (num_classes, cam_size, cam_size)),
        TensorSpec(OOD_SCORE, OUTPUT_DTYPE, (1,)),
    )
    return specs[:1] if classifier else specs if ood else specs[:3]

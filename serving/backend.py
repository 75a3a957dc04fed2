"""The model a front door serves, whichever runs it: :class:`ModelBackend`, the one interface of
:class:`~.triton_client.TritonModel` (Triton over gRPC, the default) and :class:`~.local_model.LocalModel` (ONNX
Runtime in this process), and :class:`ModelInfo`, what serving reads about the deployed model from its config.pbtxt.
The pipeline and the explainer depend on this module only, never on a backend's own module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ..export.contract import (
    BASE_OUTPUTS,
    FULL_OUTPUTS,
    PARAM_CAM_SIZE,
    PARAM_CLASSES,
    PARAM_DISAGREE_MIN_AREA,
    PARAM_OOD_THRESHOLD,
    PARAM_PREPROCESS,
    PARAM_REFER_THRESHOLD,
    PARAM_TEMPERATURE,
)
from ..train.preprocess import PreprocessConfig
from ..train.refer import ReferRules
from .errors import UpstreamError


@dataclass(frozen=True)
class ModelInfo:
    """What serving needs to know about the deployed model, from its config.pbtxt (Triton's model-config API, or the
    file itself for the in-process backend): no other local file."""

    name: str
    version: str
    classes: tuple[str, ...]
    preprocess: PreprocessConfig
    temperature: float
    refer_threshold: float | None
    cam_size: int
    max_batch_size: int
    disagree_min_area: float | None = None  # model-input pixels (train/refer.py); None: a model fitted before the rule
    ood_threshold: float | None = None  # train/ood.py; None: a model exported without the learned OOD score
    outputs: tuple[str, ...] = BASE_OUTPUTS  # what the full model computes (ood_score only in newer exports)

    @classmethod
    def from_config(cls, config: dict, version: str = "") -> ModelInfo:
        """From Triton's model config (JSON form); a clear error if the model was not exported by braintumor.

        A model without braintumor's parameters is a deployment error that no retry fixes: UpstreamError (500).
        """
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        missing = [k for k in (PARAM_CLASSES, PARAM_PREPROCESS) if not params.get(k)]
        if missing:
            raise UpstreamError(f"model {config.get('name')!r} has no {missing} parameters in its config.pbtxt; "
                                "serve a repository written by `braintumor export`")
        refer = params.get(PARAM_REFER_THRESHOLD)
        try:
            return cls(
                name=config["name"],
                version=version,
                classes=tuple(json.loads(params[PARAM_CLASSES])),
                preprocess=PreprocessConfig.from_dict(json.loads(params[PARAM_PREPROCESS])),
                temperature=float(json.loads(params.get(PARAM_TEMPERATURE) or "1.0")),
                refer_threshold=float(json.loads(refer)) if refer else None,
                cam_size=int(json.loads(params.get(PARAM_CAM_SIZE) or "0")),
                max_batch_size=int(config.get("max_batch_size", 1)) or 1,
                disagree_min_area=float(json.loads(area)) if (area := params.get(PARAM_DISAGREE_MIN_AREA)) else None,
                ood_threshold=float(json.loads(ood)) if (ood := params.get(PARAM_OOD_THRESHOLD)) else None,
                outputs=_full_outputs(config),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UpstreamError(f"model {config.get('name')!r} has unreadable braintumor parameters in its "
                                f"config.pbtxt ({exc}); re-export it with `braintumor export`") from exc

    @property
    def refer_rules(self) -> ReferRules:
        return ReferRules(self.refer_threshold, self.disagree_min_area, self.ood_threshold)

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "classes": list(self.classes),
                "refer_threshold": self.refer_threshold, "disagree_min_area": self.disagree_min_area,
                "ood_threshold": self.ood_threshold, "temperature": self.temperature,
                "image_size": self.preprocess.image_size, "geometry": self.preprocess.geometry}


def _full_outputs(config: dict) -> tuple[str, ...]:
    """The contract's full-graph outputs this model declares (older models have no ood_score)."""
    declared = {o.get("name") for o in config.get("output", [])}
    return tuple(n for n in FULL_OUTPUTS if n in declared) if declared else BASE_OUTPUTS


@runtime_checkable
class ModelBackend(Protocol):
    """What the pipeline and the explainer call. Failures are serving errors (:mod:`.errors`): Unavailable,
    DeadlineExceeded, BadInput for a tensor the model refuses, UpstreamError for anything else."""

    async def ready(self) -> bool:
        """Both models (full and classifier-only) can answer now."""

    async def info(self) -> ModelInfo:
        """The deployed model's metadata (cached; read again after :meth:`forget_info`)."""

    def forget_info(self) -> None:
        """Drop the cached metadata (the model may come back as another version)."""

    async def infer(self, images: np.ndarray, info: ModelInfo | None = None) -> dict[str, np.ndarray]:
        """Full model on a (N, 1, S, S) uint8 batch -> {class_probs, mask_prob, cam[, ood_score]}."""

    async def classify(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Classifier-only model on a (N, 1, S, S) uint8 batch -> (N, num_classes) calibrated probabilities."""

    async def close(self) -> None:
        """Release connections, sessions and threads."""


def chunks(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """``images`` in pieces of at most ``size`` (a model's max_batch_size), without copies."""
    for start in range(0, len(images), size):
        yield images[start:start + size]

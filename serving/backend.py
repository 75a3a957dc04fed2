"""The model a front door serves, whichever runs it: :class:`ModelBackend`, the one interface of
:class:`~.triton_client.TritonModel` (Triton over gRPC, the default) and :class:`~.local_model.LocalModel` (ONNX
Runtime in this process), and :class:`ModelInfo`, what serving reads about the deployed model (its typed contract)
from its config.pbtxt.
The pipeline and the explainer depend on this module only, never on a backend's own module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ..export.contract import BASE_OUTPUTS, FULL_OUTPUTS
from ..export.model_contract import ModelContract
from .errors import UpstreamError


@dataclass(frozen=True)
class ModelInfo:
    """What serving knows about the deployed model: its name and version as Triton (or the repository) names them,
    its batch limit and outputs, and its typed deployment contract (export/model_contract.py), read from its
    config.pbtxt parameters (Triton's model-config API, or the file itself for the in-process backend)."""

    name: str
    version: str
    contract: ModelContract
    max_batch_size: int = 1
    outputs: tuple[str, ...] = BASE_OUTPUTS  # what the full model computes (ood_score only in newer exports)

    @classmethod
    def from_config(cls, config: dict, version: str = "") -> ModelInfo:
        """From Triton's model config (JSON form); a clear error if the model was not exported by braintumor.

        A model without braintumor's parameters is a deployment error that no retry fixes: UpstreamError (500).
        """
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        try:
            contract = ModelContract.from_parameters(params)
        except KeyError as exc:
            raise UpstreamError(f"model {config.get('name')!r} has {exc.args[0]} in its config.pbtxt; serve a "
                                "repository written by `braintumor export`") from exc
        except (TypeError, ValueError) as exc:
            raise UpstreamError(f"model {config.get('name')!r} has unreadable braintumor parameters in its "
                                f"config.pbtxt ({exc}); re-export it with `braintumor export`") from exc
        return cls(config["name"], version, contract, int(config.get("max_batch_size", 1)) or 1, _full_outputs(config))

    # the contract's fields, as every stage reads them
    classes = property(lambda self: self.contract.classes)
    preprocess = property(lambda self: self.contract.preprocess)
    temperature = property(lambda self: self.contract.temperature)
    refer_threshold = property(lambda self: self.contract.refer_threshold)
    disagree_min_area = property(lambda self: self.contract.disagree_min_area)
    ood_threshold = property(lambda self: self.contract.ood_threshold)
    cam_size = property(lambda self: self.contract.cam_size)
    refer_rules = property(lambda self: self.contract.refer_rules)

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

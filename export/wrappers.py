"""Export graphs around the trained model: the full graph (class_probs, mask_prob, cam, and ood_score when the checkpoint
has a fitted OOD score) and the classifier-only graph.

Both take the preprocessed uint8 (or float 0..255) slice, shape (B, 1, H, W); normalisation is already in the model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .contract import BASE_OUTPUTS, CLASSIFIER_OUTPUTS, FULL_OUTPUTS


def _temperature(value: float | None) -> float:
    t = 1.0 if value is None else float(value)
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {value!r}; recalibrate the checkpoint")
    return t


class OodScore(nn.Module):
    """(B, K) pooled features -> (B, 1) ``min_c ||(f - mu_c) W||^2`` (train/ood.py; ``P = W W^T``).

    ``means`` and ``whitening`` are non-persistent buffers: the exporter writes them as ``Constant`` nodes, which
    fp16 weight storage (initializers only) leaves float32 — the score squares their rounding."""

    def __init__(self, means: np.ndarray, whitening: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("means", torch.as_tensor(np.asarray(means, np.float32)), persistent=False)
        self.register_buffer("whitening", torch.as_tensor(np.asarray(whitening, np.float32)), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        diff = features[:, None, :] - self.means[None]  # (B, C, K)
        return torch.matmul(diff, self.whitening).square().sum(dim=2).min(dim=1, keepdim=True).values


class FullGraph(nn.Module):
    """Encoder once -> softmax(logits / T), sigmoid(mask logits), bias-free CAM of every class and, with a fitted
    OOD score (``state["ood"]``), its value for each image."""

    def __init__(self, model: nn.Module, temperature: float | None = 1.0, ood: dict | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.register_buffer("temperature", torch.tensor(_temperature(temperature)), persistent=False)
        self.ood = OodScore(ood["means"], ood["whitening"]) if ood else None
        self.output_names = FULL_OUTPUTS if ood else BASE_OUTPUTS
        self.eval()  # exporters restore the wrapper's own mode on the whole tree afterwards

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.model.forward_features(image.float())
        mask_logits = self.model.segment(features)  # the decoder once, also for class_pool "mask"
        probs = torch.softmax(self.model.classify(features, mask_logits) / self.temperature, dim=1)
        outputs = (probs, torch.sigmoid(mask_logits), self.model.class_activation_maps(features, mask_logits))
        if self.ood is not None:
            outputs += (self.ood(self.model.class_features(features, mask_logits)),)
        return outputs


class ClassifierGraph(nn.Module):
    """Encoder + class head only, for explainers that call the model hundreds of times per image (with ``class_pool``
    "mask" the decoder too: the decision pools with the mask)."""

    output_names = CLASSIFIER_OUTPUTS

    def __init__(self, model: nn.Module, temperature: float | None = 1.0) -> None:
        super().__init__()
        self.model = model.eval()
        self.register_buffer("temperature", torch.tensor(_temperature(temperature)), persistent=False)
        self.eval()  # exporters restore the wrapper's own mode on the whole tree afterwards

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(image.float())
        return torch.softmax(self.model.classify(features) / self.temperature, dim=1)


def build_graphs(model: nn.Module, state: dict) -> dict[str, nn.Module]:
    """``{"full": FullGraph, "classifier": ClassifierGraph}`` with the checkpoint's temperature (1.0 if absent) and OOD
    score (none if not fitted)."""
    temperature = state.get("temperature")
    return {"full": FullGraph(model, temperature, state.get("ood")), "classifier": ClassifierGraph(model, temperature)}


def cam_size(model: nn.Module, image_size: int) -> int:
    """Side of the CAM grid: the input side over the model's ``cam_stride`` (the class head's pooled grid)."""
    return image_size // int(model.cam_stride)

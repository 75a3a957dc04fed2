"""Export graphs around the trained model: the full graph (class_probs, mask_prob, cam) and the classifier-only graph.

Both take the preprocessed uint8 (or float 0..255) slice, shape (B, 1, H, W); normalisation is already in the model.
"""

from __future__ import annotations

import torch
from torch import nn

from .contract import CLASSIFIER_OUTPUTS, FULL_OUTPUTS


def _temperature(value: float | None) -> float:
    t = 1.0 if value is None else float(value)
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {value!r}; recalibrate the checkpoint")
    return t


class FullGraph(nn.Module):
    """Encoder once -> softmax(logits / T), sigmoid(mask logits), bias-free CAM of every class."""

    output_names = FULL_OUTPUTS

    def __init__(self, model: nn.Module, temperature: float | None = 1.0) -> None:
        super().__init__()
        self.model = model.eval()
        self.register_buffer("temperature", torch.tensor(_temperature(temperature)), persistent=False)
        self.eval()  # exporters restore the wrapper's own mode on the whole tree afterwards

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(image.float())
        probs = torch.softmax(self.model.classify(features) / self.temperature, dim=1)
        return probs, torch.sigmoid(self.model.segment(features)), self.model.class_activation_maps(features)


class ClassifierGraph(nn.Module):
    """Encoder + class head only, for explainers that call the model hundreds of times per image."""

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
    """``{"full": FullGraph, "classifier": ClassifierGraph}`` with the checkpoint's temperature (1.0 if absent)."""
    temperature = state.get("temperature")
    return {"full": FullGraph(model, temperature), "classifier": ClassifierGraph(model, temperature)}


def cam_size(model: nn.Module, image_size: int) -> int:
    """Side of the CAM grid: the input side over the model's ``cam_stride`` (the class head's pooled grid)."""
    return image_size // int(model.cam_stride)

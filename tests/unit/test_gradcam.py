"""Closed-form Grad-CAM agrees with pytorch-grad-cam's hook-and-backward GradCAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from braintumor.train.factory import build_model
from braintumor.train.gradcam import grad_cam


class ClassLogits(nn.Module):
    """Exposes only the classification output, as pytorch-grad-cam expects (the decoder is not run)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.classify(self.model.forward_features(x))


class GradCAMAtFeatureSize(GradCAM):
    """Skip pytorch-grad-cam's cv2 resize: resizing to the feature map's own size is the identity."""

    def __init__(self, model: nn.Module, target_layers: list[nn.Module], size: tuple[int, int]) -> None:
        super().__init__(model, target_layers)
        self.size = size

    def get_target_width_height(self, input_tensor: torch.Tensor) -> tuple[int, int]:
        return self.size[1], self.size[0]


def _minmax(maps: np.ndarray) -> np.ndarray:
    lo = maps.min(axis=(1, 2), keepdims=True)
    return (maps - lo) / (maps.max(axis=(1, 2), keepdims=True) - lo)


@pytest.fixture(scope="module", params=[32, 16], ids=["cam_stride32", "cam_stride16"])
def model(request) -> nn.Module:
    torch.manual_seed(0)
    return build_model("test_resnet", cam_stride=request.param).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randint(0, 256, (2, 1, 128, 128), generator=torch.Generator().manual_seed(1)).float()


@pytest.mark.parametrize("target", [0, 1, 2, 3])
def test_matches_pytorch_grad_cam(model: nn.Module, x: torch.Tensor, target: int) -> None:
    with torch.no_grad():
        size = tuple(model.class_activation_maps(model.forward_features(x)).shape[-2:])
    assert size == (128 // model.cam_stride,) * 2
    with GradCAMAtFeatureSize(ClassLogits(model), [model.cam_layer], size) as cam:
        expected = cam(x, targets=[ClassifierOutputTarget(target)] * len(x))
    ours = grad_cam(model, x, target, size=size).numpy()
    assert ours.shape == (2, *size) == expected.shape
    assert (ours.max(axis=(1, 2)) > 0).all()  # non-degenerate maps, so the comparison means something
    np.testing.assert_allclose(_minmax(ours), _minmax(expected), atol=1e-5)


def test_heatmap_at_input_size_in_unit_range(model: nn.Module, x: torch.Tensor) -> None:
    maps = grad_cam(model, x)
    assert maps.shape == (2, 128, 128)
    assert maps.min() >= 0 and torch.allclose(maps.amax(dim=(1, 2)), torch.ones(2))


def test_default_target_is_the_predicted_class(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        predicted = model(x)[0].argmax(dim=1)
    torch.testing.assert_close(grad_cam(model, x), grad_cam(model, x, predicted.tolist()))


def test_no_positive_evidence_gives_zeros(x: torch.Tensor) -> None:
    model = build_model("test_resnet").eval()
    nn.init.zeros_(model.classification_head.fc.weight)
    maps = grad_cam(model, x, 0)
    assert torch.equal(maps, torch.zeros_like(maps))

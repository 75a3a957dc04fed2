"""Task heads on top of encoder/decoder features: tumour class logits and tumour mask logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class CamFusion(nn.Module):
    """The map the class head pools and Grad-CAM explains: every encoder feature at a reduction >= ``cam_stride``,
    brought to the ``cam_stride`` grid by nearest upsampling and concatenated on channels.

    Nearest upsampling by an integer factor keeps each map's spatial mean, so GAP over the fused map is GAP of each
    feature, and the bias-free CAM of the head on this grid is exact Grad-CAM at stride ``cam_stride``
    (the deepest features alone give a 6x6 map at 192 px; with the stride-16 features it is 12x12).
    """

    def __init__(self, channels: Sequence[int], reductions: Sequence[int], cam_stride: int) -> None:
        super().__init__()
        if cam_stride not in reductions:
            raise ValueError(f"cam_stride {cam_stride} is not one of the encoder's reductions {tuple(reductions)}")
        self.indices = [i for i, r in enumerate(reductions) if r >= cam_stride]
        self.factors = [int(reductions[i]) // cam_stride for i in self.indices]
        self.out_channels = int(sum(channels[i] for i in self.indices))
        self.stride = cam_stride

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        maps = [features[i] if f == 1 else F.interpolate(features[i], scale_factor=float(f), mode="nearest")
                for i, f in zip(self.indices, self.factors)]
        return maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)


class ClassificationHead(nn.Module):
    """Global average pool -> dropout -> linear. Linear after GAP makes class activation maps exact."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    @staticmethod
    def pool(x: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) -> (B, K): the pooled feature the linear layer reads (also the OOD score's feature)."""
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(x)))

    def activation_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Bias-free CAM, (B, num_classes, h, w): ``sum_k fc.weight[c, k] * x[:, k]``.

        Its spatial mean plus ``fc.bias`` equals the eval-mode logits.
        """
        return F.conv2d(x, self.fc.weight[:, :, None, None])


class SegmentationHead(nn.Module):
    """3x3 conv to one mask-logit channel, then bilinear upsampling by ``upsampling`` to input resolution."""

    def __init__(self, in_channels: int, upsampling: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, kernel_size=3, padding=1)
        self.upsampling = upsampling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.upsampling > 1:
            x = F.interpolate(x, scale_factor=float(self.upsampling), mode="bilinear", align_corners=False)
        return x

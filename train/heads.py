"""Task heads on top of encoder/decoder features: tumour class logits and tumour mask logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClassificationHead(nn.Module):
    """Global average pool -> dropout -> linear. Linear after GAP makes class activation maps exact."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x.mean(dim=(2, 3))))

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

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


CLASS_POOLS = ("mean", "mask")


def mask_pool_weights(mask_logits: torch.Tensor, cell: int, floor: float) -> torch.Tensor:
    """(B, 1, H, W) mask logits -> (B, 1, H/cell, W/cell) pooling weights that sum to 1 over the grid.

    ``m`` = sigmoid of the mask logits, average-pooled over ``cell`` x ``cell`` pixels (the CAM grid's cells: a
    constant, so the exported graph has no shape arithmetic) and **detached** (the class loss must not move the
    mask); weights ``(m + floor) / sum_hw (m + floor)``: a slice with an empty mask pools uniformly (plain GAP).
    """
    prob = torch.sigmoid(mask_logits.detach().float())
    weight = F.avg_pool2d(prob, kernel_size=cell, stride=cell) + floor
    return weight / weight.sum(dim=(2, 3), keepdim=True)


class ClassificationHead(nn.Module):
    """Spatial pool -> dropout -> linear. A linear layer after a (weighted) mean makes class activation maps exact.

    ``pool_mode`` ``"mean"``: global average pooling. ``"mask"``: the mean weighted by the segmentation head's own
    mask probability (:func:`mask_pool_weights`, with ``pool_floor``), so the decision reads the tumour's region.
    The methods take those ``weights`` (None for ``"mean"``); :meth:`pool_weights` computes them.
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.2, pool_mode: str = "mean",
                 pool_floor: float = 0.1, cam_stride: int = 32) -> None:
        super().__init__()
        if pool_mode not in CLASS_POOLS:
            raise ValueError(f"class_pool {pool_mode!r} is not one of {CLASS_POOLS}")
        if not pool_floor > 0:
            raise ValueError(f"class_pool_floor must be > 0 (an empty mask then pools uniformly), got {pool_floor}")
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)
        self.pool_mode, self.pool_floor = pool_mode, float(pool_floor)
        self.cam_stride = int(cam_stride)  # input pixels per CAM cell: the mask (input resolution) pools by it

    @property
    def needs_mask(self) -> bool:
        return self.pool_mode == "mask"

    def pool_weights(self, x: torch.Tensor, mask_logits: torch.Tensor | None) -> torch.Tensor | None:
        """(B, 1, h, w) weights over ``x``'s grid (None: plain GAP); ``"mask"`` mode needs the mask logits at the
        input resolution (the segmentation head's output)."""
        if not self.needs_mask:
            return None
        if mask_logits is None:
            raise ValueError("class_pool 'mask' pools with the mask head's probability; pass the mask logits")
        weights = mask_pool_weights(mask_logits, self.cam_stride, self.pool_floor)
        if not torch.jit.is_tracing() and weights.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"mask logits {tuple(mask_logits.shape[-2:])} pooled by cam_stride {self.cam_stride} give "
                             f"{tuple(weights.shape[-2:])}, not the CAM grid {tuple(x.shape[-2:])}")
        return weights

    @staticmethod
    def pool(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, h, w) -> (B, K): the pooled feature the linear layer reads (also the OOD score's feature)."""
        return x.mean(dim=(2, 3)) if weights is None else (x * weights).sum(dim=(2, 3))

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(x, weights)))

    def activation_maps(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Bias-free CAM, (B, num_classes, h, w): ``(h*w) * weights * sum_k fc.weight[c, k] * x[:, k]``
        (``weights`` = 1/(h*w) for GAP).

        Its spatial mean plus ``fc.bias`` equals the eval-mode logits, in either pool mode.
        """
        cams = F.conv2d(x, self.fc.weight[:, :, None, None])
        if weights is None:
            return cams
        return cams * (weights * (x.shape[-2] * x.shape[-1]))


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

"""U-Net decoder: each block upsamples x2, concatenates the encoder skip at that stride and applies two
conv-bn-relu. Decoding stops at ``mask_stride`` (1, 2 or 4) so a coarse mask costs less on CPU."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MASK_STRIDES = (1, 2, 4)


class Conv2dReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = Conv2dReLU(in_channels + skip_channels, out_channels)
        self.conv2 = Conv2dReLU(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UnetDecoder(nn.Module):
    """Decodes encoder features from the deepest stride down to ``mask_stride``.

    One block per halving of the stride; a block uses the encoder feature at its output stride as skip when
    the encoder has one (strides finer than the encoder's first feature get no skip).
    ``decoder_channels[i]`` is the width of block i; extra entries are ignored.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        encoder_reductions: Sequence[int],
        decoder_channels: Sequence[int] = (128, 64, 32, 16, 16),
        mask_stride: int = 2,
    ) -> None:
        super().__init__()
        reductions = list(encoder_reductions)
        if any(a >= b for a, b in zip(reductions, reductions[1:])):
            raise ValueError(f"encoder reductions {reductions} are not strictly increasing; a U-Net needs a pyramid")
        if mask_stride not in MASK_STRIDES:
            raise ValueError(f"mask_stride {mask_stride} is not one of {MASK_STRIDES}")
        strides, stride = [], reductions[-1]
        while stride > mask_stride:
            stride //= 2
            strides.append(stride)
        if stride != mask_stride:
            raise ValueError(f"deepest encoder reduction {reductions[-1]} is not a power of two multiple of {mask_stride}")
        if len(decoder_channels) < len(strides):
            raise ValueError(
                f"decoder_channels {tuple(decoder_channels)} has {len(decoder_channels)} entries; "
                f"mask_stride {mask_stride} needs {len(strides)}"
            )
        skip_index = {r: i for i, r in enumerate(reductions[:-1])}
        self.skip_indices = [skip_index.get(s) for s in strides]
        blocks, in_channels = [], encoder_channels[-1]
        for i, out_channels in zip(self.skip_indices, decoder_channels):
            blocks.append(DecoderBlock(in_channels, 0 if i is None else encoder_channels[i], out_channels))
            in_channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = in_channels
        self.output_stride = mask_stride

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for block, i in zip(self.blocks, self.skip_indices):
            x = block(x, None if i is None else features[i])
        return x

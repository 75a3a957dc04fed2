"""The multi-task network: wiring only (normalise -> encoder -> class head and decoder -> mask head)."""

from __future__ import annotations

import torch
from torch import nn

from .decoder import UnetDecoder
from .encoder import Encoder
from .heads import CamFusion, ClassificationHead, SegmentationHead


class Normalize(nn.Module):
    """``(x - mean) / std`` on the uint8 0..255 scale. Constants come from PreprocessConfig (saved in the model
    config), so they are non-persistent buffers rather than a second copy in the state dict."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)).view(1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(float(std)).view(1, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MultiTaskModel(nn.Module):
    """Input (B, 1, H, W) float pixels in 0..255, H and W multiples of the encoder's deepest reduction.

    ``forward`` returns ``(class_logits (B, C), mask_logits (B, 1, H, W))`` in that fixed order.
    """

    def __init__(
        self,
        normalize: Normalize,
        encoder: Encoder,
        decoder: UnetDecoder,
        classification_head: ClassificationHead,
        segmentation_head: SegmentationHead,
        config: dict | None = None,
        cam_fusion: CamFusion | None = None,
    ) -> None:
        super().__init__()
        self.normalize = normalize
        self.encoder = encoder
        # The classification head's input grid (default: the deepest feature map alone).
        self.cam_fusion = cam_fusion or CamFusion(encoder.channels, encoder.reductions, encoder.reductions[-1])
        self.decoder = decoder
        self.classification_head = classification_head
        self.segmentation_head = segmentation_head
        self.config = dict(config or {})  # build_model(**config) rebuilds this architecture

    @property
    def cam_layer(self) -> nn.Module:
        """Module whose output is the map the class head pools, for hook-based explainers (pytorch-grad-cam)."""
        return self.cam_fusion

    @property
    def cam_stride(self) -> int:
        return self.cam_fusion.stride

    @property
    def class_needs_mask(self) -> bool:
        """True with ``class_pool`` "mask": the class decision needs the mask logits (pass them when you have them)."""
        return self.classification_head.needs_mask

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(self.normalize(x))

    def classify(self, features: list[torch.Tensor], mask_logits: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C) class logits. With ``class_pool`` "mask" the head pools with the mask head's probability: pass
        ``mask_logits`` when you already have them, else the decoder runs here."""
        return self.classification_head(*self._class_input(features, mask_logits))

    def class_features(self, features: list[torch.Tensor], mask_logits: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) the class head's pooled input, before dropout and the linear layer (train/ood.py's feature)."""
        return self.classification_head.pool(*self._class_input(features, mask_logits))

    def segment(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.segmentation_head(self.decoder(features))

    def class_activation_maps(self, features: list[torch.Tensor],
                              mask_logits: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, h, w) bias-free CAM on the ``cam_stride`` grid; spatial mean + bias = eval-mode logits."""
        return self.classification_head.activation_maps(*self._class_input(features, mask_logits))

    def _class_input(self, features: list[torch.Tensor], mask_logits: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused map and its pooling weights (None: GAP); the decoder runs only if the head needs a mask that
        the caller did not pass."""
        fused = self.cam_fusion(features)
        if self.classification_head.needs_mask and mask_logits is None:
            mask_logits = self.segment(features)
        return fused, self.classification_head.pool_weights(fused, mask_logits)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.forward_features(x)
        mask_logits = self.segment(features)  # once, also for the class head's mask pooling
        return self.classify(features, mask_logits), mask_logits

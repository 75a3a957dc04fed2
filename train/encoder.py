"""The image encoder: a greyscale timm ``features_only`` backbone returning one feature map per reduction."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn


class Encoder(nn.Module):
    """timm backbone with ``in_chans=1``; ``channels`` and ``reductions`` are read from its ``feature_info``.

    ``pretrained`` is False (random init), True (timm's own weights, read from the local HF/timm cache when
    present, downloaded otherwise) or the path of a local checkpoint of the full timm model. RGB weights are
    adapted to one input channel by timm (the stem's RGB kernels are summed).
    """

    def __init__(
        self,
        name: str,
        pretrained: bool | str | Path = False,
        out_indices: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        kwargs: dict = {} if out_indices is None else {"out_indices": tuple(out_indices)}
        if isinstance(pretrained, (str, Path)):
            path = Path(pretrained)
            if not path.is_file():
                raise FileNotFoundError(f"pretrained checkpoint {path} not found; pass False, True or an existing file")
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
            pretrained = True
        self.name = name
        self.model = timm.create_model(name, features_only=True, pretrained=bool(pretrained), in_chans=1, **kwargs)
        info = self.model.feature_info
        self.channels: tuple[int, ...] = tuple(info.channels())
        self.reductions: tuple[int, ...] = tuple(info.reduction())
        self.last_layer = _feature_module(self.model, info.module_name()[-1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x))


def _feature_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule whose output is the feature ``name``: FeatureListNet flattens ``a.b`` to ``a_b``,
    FeatureGetterNet keeps the whole network under ``model``."""
    for candidate in (name, name.replace(".", "_"), f"model.{name}"):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    raise ValueError(f"cannot find feature module {name!r} in {type(model).__name__}; hook-based CAMs need it")

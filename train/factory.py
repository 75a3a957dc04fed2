"""Builds the multi-task model from names and a plain config dict (the dict stored in every checkpoint)."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from pathlib import Path

import timm

from .decoder import MASK_STRIDES, UnetDecoder
from .encoder import Encoder
from .heads import CLASS_POOLS, CamFusion, ClassificationHead, SegmentationHead
from .model import MultiTaskModel, Normalize
from .naming import CLASSES
from .preprocess import PreprocessConfig
from .pretrained import IMAGENET, IMAGENET_NORMALIZATION, PretrainedWeightsError

RECOMMENDED_ENCODERS = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "resnet18", "resnet34")
DEFAULT_DECODER_CHANNELS = (128, 64, 32, 16, 16)


def build_model(
    encoder: str = "resnet18",
    num_classes: int = len(CLASSES),
    preprocess: PreprocessConfig | dict | None = None,
    pretrained: bool | str | Path = False,
    decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
    mask_stride: int = 2,
    dropout: float = 0.2,
    cam_stride: int | None = None,
    class_pool: str = "mean",
    class_pool_floor: float = 0.1,
) -> MultiTaskModel:
    """Build a MultiTaskModel; ``model.config`` round-trips through ``build_model(**model.config)``.

    ``encoder`` is any timm model that supports ``features_only`` (resnet18/34/50 recommended).
    ``pretrained`` (False, ``"imagenet"``, True or a checkpoint path) only affects initial weights, so it is not in
    the config; with ``"imagenet"`` the preprocess normalisation is set to what the weights expect.
    ``cam_stride``: the grid of the class head's pooled map and of Grad-CAM (None: the deepest reduction).
    ``class_pool``: how the class head pools that map, ``"mean"`` (GAP) or ``"mask"`` (weighted by the mask head's own
    detached probability at the CAM grid, plus ``class_pool_floor`` so an empty mask pools uniformly).
    """
    if isinstance(preprocess, dict):
        preprocess = PreprocessConfig.from_dict(preprocess)
    preprocess = preprocess or PreprocessConfig()
    if pretrained == IMAGENET:
        preprocess = dataclasses.replace(preprocess, **IMAGENET_NORMALIZATION)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if mask_stride not in MASK_STRIDES:
        raise ValueError(f"mask_stride {mask_stride} is not one of {MASK_STRIDES}")
    if class_pool not in CLASS_POOLS:
        raise ValueError(f"class_pool {class_pool!r} is not one of {CLASS_POOLS}")
    if not class_pool_floor > 0:
        raise ValueError(f"class_pool_floor must be > 0 (an empty mask then pools uniformly), got {class_pool_floor}")
    enc = _build_encoder(encoder, pretrained)
    if preprocess.image_size % enc.reductions[-1]:
        raise ValueError(
            f"image_size {preprocess.image_size} is not a multiple of {enc.reductions[-1]}, "
            f"the deepest reduction of encoder {encoder!r}"
        )
    decoder = UnetDecoder(enc.channels, enc.reductions, decoder_channels, mask_stride)
    fusion = CamFusion(enc.channels, enc.reductions, int(cam_stride or enc.reductions[-1]))
    config = {
        "encoder": encoder,
        "num_classes": num_classes,
        "preprocess": preprocess.to_dict(),
        "decoder_channels": [int(c) for c in decoder_channels],
        "mask_stride": mask_stride,
        "dropout": dropout,
        "cam_stride": fusion.stride,
        "class_pool": class_pool,
        "class_pool_floor": float(class_pool_floor),
    }
    return MultiTaskModel(
        normalize=Normalize(preprocess.mean, preprocess.std),
        encoder=enc,
        decoder=decoder,
        classification_head=ClassificationHead(fusion.out_channels, num_classes, dropout, pool_mode=class_pool,
                                               pool_floor=class_pool_floor, cam_stride=fusion.stride),
        segmentation_head=SegmentationHead(decoder.out_channels, upsampling=mask_stride),
        config=config,
        cam_fusion=fusion,
    )


def _build_encoder(name: str, pretrained: bool | str | Path) -> Encoder:
    if not timm.is_model(name):
        raise ValueError(_unknown_encoder_message(name, "is not a timm model"))
    try:
        return Encoder(name, pretrained=pretrained)
    except PretrainedWeightsError:
        raise
    except (RuntimeError, AssertionError, TypeError) as exc:  # timm's errors for models without features_only
        raise ValueError(_unknown_encoder_message(name, f"does not support features_only ({exc})")) from exc


def _unknown_encoder_message(name: str, reason: str) -> str:
    resnets = timm.list_models("resnet*")
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (
        f"encoder {name!r} {reason}.{hint} Recommended: {', '.join(RECOMMENDED_ENCODERS)}. "
        f"Also valid: any timm model with features_only, e.g. the resnet family: {', '.join(resnets)}."
    )

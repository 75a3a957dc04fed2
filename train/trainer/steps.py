"""Per-task training steps: each runs only the encoder and its own head, with its own loss.

Steps call ``net(image, task)`` (a :class:`TaskForward`), never the model's methods directly: DistributedDataParallel
only sees calls to ``forward``, and it must see every step to synchronise its gradients. Two exceptions to "its own
head": with ``class_pool`` "mask" a classification step also runs the decoder (its pooling weights, detached, so the
decoder gets no gradient there), and with ``lambda_cam`` a segmentation step also runs the class head
(:data:`SEG_CAM`) for its CAM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..losses import cam_outside_loss, classification_loss, segmentation_loss
from .schedule import CLS, SEG

SEG_CAM = "seg+cam"  # a forward mode, not a scheduled task: mask logits and the class activation maps


class TaskForward(nn.Module):
    """``forward(image, task)``: the encoder and the one head of ``task`` (the logits of that head only); with
    :data:`SEG_CAM`, ``(mask logits, class activation maps)`` from one encoder and one decoder pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, task: str) -> torch.Tensor:
        features = self.model.forward_features(image)
        if task == CLS:
            return self.model.classify(features)
        if task == SEG:
            return self.model.segment(features)
        if task == SEG_CAM:
            mask_logits = self.model.segment(features)
            return mask_logits, self.model.class_activation_maps(features, mask_logits)
        raise ValueError(f"unknown task {task!r}; expected {CLS!r}, {SEG!r} or {SEG_CAM!r}")


@dataclass
class TaskStep:
    """A task's loader, its sampler (re-seeded each epoch) and its loss; ``loss`` returns (loss, logged values)."""

    name: str
    loader: DataLoader
    weight: float = 1.0
    _iter: object = field(default=None, init=False, repr=False)
    _epoch: int = field(default=0, init=False, repr=False)
    _restarts: int = field(default=0, init=False, repr=False)

    def start_epoch(self, epoch: int) -> None:
        self._epoch, self._restarts, self._iter = epoch, 0, None

    def next_batch(self) -> dict:
        """Next batch; a loader shorter than the epoch's demand restarts with a new, still deterministic order."""
        while True:
            if self._iter is None:
                self.loader.sampler.set_epoch(self._epoch * 1000 + self._restarts)
                self._iter = iter(self.loader)
                self._restarts += 1
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None

    def loss(self, net: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """``net`` is a :class:`TaskForward` (possibly inside DistributedDataParallel)."""
        raise NotImplementedError


@dataclass
class ClassificationStep(TaskStep):
    label_smoothing: float = 0.0

    def loss(self, net, batch):
        logits = net(batch["image"], CLS)
        loss = classification_loss(logits, batch["label"], label_smoothing=self.label_smoothing)
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        return self.weight * loss, {"cls_loss": loss.item(), "cls_acc": acc.item()}


@dataclass
class SegmentationStep(TaskStep):
    """``weight`` * (BCE + Dice), plus ``cam_weight`` * :func:`cam_outside_loss` of the true class's CAM (logged as
    ``cam_loss``) when ``cam_weight`` > 0."""

    bce_weight: float = 0.5
    dice_weight: float = 0.5
    cam_weight: float = 0.0

    def loss(self, net, batch):
        if self.cam_weight > 0:
            logits, cams = net(batch["image"], SEG_CAM)
        else:
            logits, cams = net(batch["image"], SEG), None
        loss = segmentation_loss(logits, batch["mask"].float(), bce_weight=self.bce_weight, dice_weight=self.dice_weight)
        logs = {"seg_loss": loss.item()}
        total = self.weight * loss
        if cams is not None:
            cam_loss = cam_outside_loss(cams, batch["label"], batch["mask"])
            total = total + self.cam_weight * cam_loss
            logs["cam_loss"] = cam_loss.item()
        return total, logs

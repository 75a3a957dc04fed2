"""Per-task training steps: each runs only the encoder and its own head, with its own loss."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from ..losses import classification_loss, segmentation_loss


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

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


@dataclass
class ClassificationStep(TaskStep):
    label_smoothing: float = 0.0

    def loss(self, model, batch):
        logits = model.classify(model.forward_features(batch["image"]))
        loss = classification_loss(logits, batch["label"], label_smoothing=self.label_smoothing)
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        return self.weight * loss, {"cls_loss": loss.item(), "cls_acc": acc.item()}


@dataclass
class SegmentationStep(TaskStep):
    bce_weight: float = 0.5
    dice_weight: float = 0.5

    def loss(self, model, batch):
        logits = model.segment(model.forward_features(batch["image"]))
        loss = segmentation_loss(logits, batch["mask"].float(), bce_weight=self.bce_weight, dice_weight=self.dice_weight)
        return self.weight * loss, {"seg_loss": loss.item()}

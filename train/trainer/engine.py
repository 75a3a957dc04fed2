"""The alternating trainer: walks the task schedule, one optimiser step per batch, validation and callbacks per epoch."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import nullcontext
from typing import Callable

import torch
from tqdm import tqdm

from .schedule import TaskSchedule
from .steps import TaskStep


class AlternatingTrainer:
    def __init__(self, model: torch.nn.Module, steps: dict[str, TaskStep], schedule: TaskSchedule, cls_steps_per_epoch: int,
                 optimizer: torch.optim.Optimizer, scheduler, *, device: torch.device, amp: bool = False,
                 channels_last: bool = False, validate: Callable[[torch.nn.Module], dict] | None = None,
                 callbacks: list[Callable] = (), progress: bool = True):
        self.model, self.steps, self.schedule = model, steps, schedule
        self.cls_steps_per_epoch = cls_steps_per_epoch
        self.optimizer, self.scheduler = optimizer, scheduler
        self.device, self.channels_last, self.progress = device, channels_last, progress
        self.amp = amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.validate, self.callbacks = validate, list(callbacks)
        self.best_score: float | None = None

    def _to_device(self, batch: dict) -> dict:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        image = batch["image"].float()
        batch["image"] = image.contiguous(memory_format=torch.channels_last) if self.channels_last else image
        return batch

    def train_epoch(self, epoch: int) -> dict:
        self.model.train()
        for step in self.steps.values():
            step.start_epoch(epoch)
        tasks = self.schedule.epoch(self.cls_steps_per_epoch)
        sums, counts, images = defaultdict(float), defaultdict(int), 0
        start = time.perf_counter()
        bar = tqdm(tasks, desc=f"epoch {epoch}", unit="step", disable=not self.progress, dynamic_ncols=True)
        for task in bar:
            step = self.steps[task]
            batch = self._to_device(step.next_batch())
            autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()
            with autocast:
                loss, logs = step.loss(self.model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            images += len(batch["image"])
            for key, value in logs.items():
                sums[key] += value
                counts[key] += 1
            bar.set_postfix({k: f"{sums[k] / counts[k]:.3f}" for k in sums}, refresh=False)
        seconds = time.perf_counter() - start
        return {**{f"train_{k}": sums[k] / counts[k] for k in sums}, "lr": self.scheduler.get_last_lr()[0],
                "train_images_per_s": images / seconds if seconds else 0.0, "epoch_seconds": seconds}

    def fit(self, start_epoch: int, epochs: int) -> None:
        for epoch in range(start_epoch + 1, epochs + 1):
            logs = self.train_epoch(epoch)
            if self.validate is not None:
                logs.update(self.validate(self.model))
            for callback in self.callbacks:
                callback(self, epoch, logs)
            if self.progress:
                shown = {k: round(v, 4) for k, v in logs.items() if k.startswith("val_")}
                tqdm.write(f"epoch {epoch}/{epochs}: {shown}")

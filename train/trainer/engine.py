"""The alternating trainer: walks the task schedule, one optimiser step per batch, validation and callbacks per epoch.

Under torchrun every rank runs the same schedule on its own shard of each task's batches, with the model in
DistributedDataParallel; rank 0 alone validates and runs the callbacks (checkpoints, history) while the others wait.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import nullcontext
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..distributed import DistContext
from ..progress import progress_bar
from .schedule import TaskSchedule
from .steps import TaskForward, TaskStep


class AlternatingTrainer:
    def __init__(self, model: torch.nn.Module, steps: dict[str, TaskStep], schedule: TaskSchedule, cls_steps_per_epoch: int,
                 optimizer: torch.optim.Optimizer, scheduler, *, device: torch.device, amp: bool = False,
                 channels_last: bool = False, validate: Callable[[torch.nn.Module], dict] | None = None,
                 callbacks: list[Callable] = (), progress: bool = True, dist: DistContext = DistContext()):
        # ``model`` stays the plain module (validation, checkpoints); ``net`` is what the steps call.
        self.model, self.steps, self.schedule = model, steps, schedule
        self.dist = dist
        self.net: torch.nn.Module = TaskForward(model)
        if dist.enabled:
            # Each step runs the encoder and ONE head, so the other head's parameters get no gradient; without
            # find_unused_parameters DDP stops at the next step ("expected to have finished reduction"). The
            # alternatives are worse: static_graph needs the same parameters every step, and running both heads
            # every step (other head * 0) pays for the decoder on classification steps and makes its gradient
            # zero instead of None, so AdamW would decay and move it there, unlike single-process training. With
            # find_unused_parameters a head unused on every rank keeps grad None (AdamW skips it, as in
            # single-process training; tested). Measured on 2 gloo CPU ranks (resnet18, 64 px, batch 8): one head
            # + find_unused 0.45 s/step, both heads without it 0.47 s/step; the graph walk itself ~0.05 s/step.
            self.net = DistributedDataParallel(
                self.net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
        self.cls_steps_per_epoch = cls_steps_per_epoch
        self.optimizer, self.scheduler = optimizer, scheduler
        self.device, self.channels_last = device, channels_last
        self.amp = amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.progress = progress and dist.is_main
        self.validate, self.callbacks = validate, list(callbacks)
        self.best_score: float | None = None

    def _to_device(self, batch: dict) -> dict:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        image = batch["image"].float()
        batch["image"] = image.contiguous(memory_format=torch.channels_last) if self.channels_last else image
        return batch

    def train_epoch(self, epoch: int) -> dict:
        """One epoch of the schedule; the logged means and images/s cover all ranks."""
        self.net.train()
        for step in self.steps.values():
            step.start_epoch(epoch)
        tasks = self.schedule.epoch(self.cls_steps_per_epoch)
        sums, counts, images = defaultdict(float), defaultdict(int), 0
        start = time.perf_counter()
        bar = progress_bar(tasks, desc=f"epoch {epoch}", unit="step", disable=not self.progress, dynamic_ncols=True)
        for task in bar:
            step = self.steps[task]
            batch = self._to_device(step.next_batch())
            autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()
            with autocast:
                loss, logs = step.loss(self.net, batch)
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
        if self.dist.enabled:
            totals = self.dist.all_reduce_sums({**{f"sum/{k}": v for k, v in sums.items()},
                                                **{f"count/{k}": v for k, v in counts.items()}, "images": images},
                                               self.device)
            sums = {k: totals[f"sum/{k}"] for k in sums}
            counts = {k: totals[f"count/{k}"] for k in counts}
            images = totals["images"]
        return {**{f"train_{k}": sums[k] / counts[k] for k in sums}, "lr": self.scheduler.get_last_lr()[0],
                "train_images_per_s": images / seconds if seconds else 0.0, "epoch_seconds": seconds}

    def fit(self, start_epoch: int, epochs: int) -> None:
        for epoch in range(start_epoch + 1, epochs + 1):
            logs = self.train_epoch(epoch)
            self.dist.broadcast_buffers(self.model)  # every rank now equals rank 0's checkpoint
            if self.dist.is_main:
                # Validation on rank 0 only: the metrics are exactly the single-process ones (ROC-AUC, ECE and
                # Dice are not sums, sharding them would need all predictions gathered), and it is short.
                if self.validate is not None:
                    logs.update(self.validate(self.model))
                for callback in self.callbacks:
                    callback(self, epoch, logs)
                if self.progress:
                    shown = {k: round(v, 4) for k, v in logs.items() if k.startswith("val_")}
                    tqdm.write(f"epoch {epoch}/{epochs}: {shown}")
            self.dist.barrier()

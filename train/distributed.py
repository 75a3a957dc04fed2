"""Multi-process (torchrun / DistributedDataParallel) plumbing: the rank context, process-group set-up and
teardown, and the few collectives the trainer needs. Without torchrun's environment everything is a no-op."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

# Rank 0 may build the data cache while the other ranks wait in a barrier; on the full dataset that takes
# minutes, longer than NCCL's 10-minute default, so the group gets a generous timeout.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. ``world_size == 1`` means plain single-process training."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sums(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """Sum each value over the ranks (metric sums and counts); one float64 all-reduce for the whole dict."""
        if not self.enabled or not values:
            return dict(values)
        keys = sorted(values)  # same order on every rank
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

        DDP broadcasts buffers at the start of each forward, so after the last step every rank holds the statistics
        of its own last batch; syncing at the epoch end makes every rank's model equal to rank 0's checkpoint.
        """
        if self.enabled:
            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=0)


def env_context() -> DistContext:
    """The rank context from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); single-process without it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistContext()
    return DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def rank_device(requested: str, ctx: DistContext) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` under torchrun with CUDA, otherwise the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if requested not in ("auto", "cuda"):
        raise ValueError(f"--device {requested!r} under torchrun: each rank uses cuda:LOCAL_RANK; "
                         "pass --device cuda (or auto, or cpu) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available; use --device cpu or auto")
    if ctx.local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {ctx.local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                           "lower --nproc_per_node")
    return torch.device("cuda", ctx.local_rank)


@contextmanager
def distributed(requested_device: str) -> Iterator[tuple[DistContext, torch.device | None]]:
    """Join torchrun's process group for the duration of the block (NCCL on CUDA, gloo on CPU) and leave it
    in ``finally``. Yields ``(context, device)``; outside torchrun it yields ``(DistContext(), None)`` and
    touches nothing. A group that is already initialised (by the caller) is used and left alone."""
    ctx = env_context()
    if not ctx.enabled:
        yield ctx, None
        return
    device = rank_device(requested_device, ctx)
    owns_group = not dist.is_initialized()
    if owns_group:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=PROCESS_GROUP_TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)
    elif dist.get_world_size() != ctx.world_size or dist.get_rank() != ctx.rank:
        raise RuntimeError("the initialised process group disagrees with RANK/WORLD_SIZE")
    try:
        yield ctx, device
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds the cache); the others run it after, when its result exists."""
    if not ctx.is_main:
        ctx.barrier()
    yield
    if ctx.is_main:
        ctx.barrier()

"""Torch datasets and epoch-seeded samplers over the uint8 cache.

Samplers yield ``(row, augmentation_seed)`` pairs derived only from (seed, epoch, position), so an epoch is
the same whether it runs straight through or after ``--resume``, with any number of workers.
"""

from __future__ import annotations

import itertools
from collections import Counter

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .naming import CLASSES


class SliceDataset(Dataset):
    def __init__(self, images: np.ndarray, masks: np.ndarray, labels: list[str], augment: A.Compose | None = None):
        self.images, self.masks = images, masks
        self.targets = np.array([CLASSES.index(label) for label in labels], dtype=np.int64)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        row, seed = item if isinstance(item, tuple) else (item, None)
        image, mask = np.array(self.images[row]), np.array(self.masks[row])  # copy out of the read-only memmap
        if self.augment is not None and self.augment.transforms:
            self.augment.set_random_seed(seed)
            out = self.augment(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image))[None],  # (1, S, S) uint8
            "mask": torch.from_numpy(np.ascontiguousarray(mask))[None],
            "label": torch.tensor(self.targets[row]),
            "row": torch.tensor(row),
        }


class _EpochSampler(Sampler):
    def __init__(self, seed: int):
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def _with_seeds(self, rows: np.ndarray, rng: np.random.Generator):
        seeds = rng.integers(0, 2**31 - 1, size=len(rows))
        return iter(zip(rows.tolist(), seeds.tolist()))


class BalancedSampler(_EpochSampler):
    """Draws ``num_samples`` rows with replacement so every class is equally likely (classification batches)."""

    def __init__(self, targets: np.ndarray, rows: np.ndarray, num_samples: int, seed: int = 0):
        super().__init__(seed)
        self.rows, self.num_samples = np.asarray(rows), num_samples
        counts = Counter(targets[self.rows].tolist())
        weights = np.array([1.0 / counts[t] for t in targets[self.rows]])
        self.p = weights / weights.sum()

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        rng = self._rng()
        return self._with_seeds(rng.choice(self.rows, size=self.num_samples, replace=True, p=self.p), rng)


class ShuffleSampler(_EpochSampler):
    """A seeded permutation of ``rows`` each epoch (segmentation batches)."""

    def __init__(self, rows: np.ndarray, seed: int = 0):
        super().__init__(seed)
        self.rows = np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        rng = self._rng()
        return self._with_seeds(rng.permutation(self.rows), rng)


class ShardedSampler(Sampler):
    """Rank ``rank``'s share of an epoch sampler under DistributedDataParallel.

    Every rank draws the same global sequence (same seed and epoch) and keeps every ``world_size``-th element
    starting at its rank, so the shards are disjoint and, batch by batch, their union is the batch of
    ``world_size * batch_size`` a single process would draw. The tail is dropped so every rank has the same
    length (and therefore the same number of batches: the task schedule must match on every rank).
    """

    def __init__(self, sampler: _EpochSampler, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.sampler, self.rank, self.world_size = sampler, rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.world_size

    def __iter__(self):
        stop = len(self) * self.world_size
        return itertools.islice(iter(self.sampler), self.rank, stop, self.world_size)

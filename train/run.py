"""Assembles a training run from its parts: index -> split -> cache -> loaders -> model -> alternating trainer.

Under torchrun (``RANK``/``WORLD_SIZE`` set) the same function runs on every rank: ``--batch-size`` is per rank,
each rank samples a disjoint shard of every task's batches, and rank 0 alone writes the run folder.
"""

from __future__ import annotations

import math
import random
from functools import partial
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader

from .augment import build_augmentation
from .cache import SliceCache, is_cache, load_cache, prepare_cache
from .config import RunConfig, save_config
from .datasets import BalancedSampler, ShardedSampler, ShuffleSampler, SliceDataset
from .distributed import DistContext, distributed, main_first
from .factory import build_model
from .metrics import classification_metrics, segmentation_metrics
from .naming import CLASSES, NO_TUMOR
from .predict import predict_arrays
from .preprocess import PreprocessConfig
from .samples import Sample, build_index
from .splits import make_validation_split, write_split_csv
from .trainer.callbacks import Checkpointer, HistoryCSV
from .trainer.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from .trainer.engine import AlternatingTrainer
from .trainer.schedule import TaskSchedule
from .trainer.steps import ClassificationStep, SegmentationStep


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_samples(data: str | Path, cfg: RunConfig) -> tuple[list[Sample], SliceCache | None]:
    """The training-split samples to use (stratified ``limit`` applied), and a ready cache if DATA is one."""
    if is_cache(data):
        cache = load_cache(data)
        samples = [s for s in cache.samples if s.split == "train"]
    else:
        cache, samples = None, build_index(data, skip_bad=cfg.data.skip_bad).split("train")
    if not samples:
        raise ValueError(f"{data}: no training-split slices found (classification_task/train or segmentation_task/train)")
    limit = cfg.data.limit
    if limit is not None and limit < len(samples):
        labels = [s.label for s in samples]
        samples, _ = train_test_split(samples, train_size=limit, stratify=labels, random_state=cfg.runtime.seed)
        samples = sorted(samples, key=lambda s: s.key)
    return samples, cache


def _validator(cache: SliceCache, rows: np.ndarray, device, channels_last: bool, dice_weight: float):
    images = np.asarray(cache.images[rows])
    masks = np.asarray(cache.masks[rows])
    y = np.array([CLASSES.index(cache.samples[r].label) for r in rows])
    tumour = masks.reshape(len(rows), -1).any(1)

    def validate(model) -> dict:
        pred = predict_arrays(model, images, device=device, channels_last=channels_last)
        cls = classification_metrics(y, pred["probs"])
        seg = segmentation_metrics(masks[tumour], pred["mask_probs"][tumour]) if tumour.any() else {"dice": 0.0, "iou": 0.0}
        score = (1 - dice_weight) * cls["accuracy"] + dice_weight * seg["dice"]
        return {"val_accuracy": cls["accuracy"], "val_macro_f1": cls["macro_f1"], "val_ece": cls["ece"],
                "val_dice": seg["dice"], "val_iou": seg["iou"], "val_score": score}

    return validate


def _lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def run_training(cfg: RunConfig, data: str | Path, out: str | Path, *, resume: bool = False,
                 callbacks: list | None = None) -> Path:
    """Train (or continue) a run in ``out``; returns the path of best.pt. ``callbacks`` run after the checkpoint
    (on rank 0 only under torchrun, which joins and leaves the process group here)."""
    with distributed(cfg.runtime.device) as (ctx, rank_device):
        return _run_training(cfg, data, Path(out), resume, callbacks, ctx, rank_device)


def _run_training(cfg: RunConfig, data: str | Path, out: Path, resume: bool, callbacks: list | None,
                  ctx: DistContext, rank_device: torch.device | None) -> Path:
    if (out / "last.pt").exists() and not resume:
        raise FileExistsError(f"{out} already holds a run (last.pt); pass --resume to continue it or choose another --out")
    state = load_checkpoint(out / "last.pt") if resume else None
    if resume and state is None:
        raise FileNotFoundError(f"{out}/last.pt not found: nothing to resume")
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    # The same seed on every rank: identical initial weights, and one random stream (dropout) that rank 0's
    # checkpoint captures for all ranks, which keeps --resume exact under torchrun too.
    seed_everything(cfg.runtime.seed)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = rank_device or resolve_device(cfg.runtime.device)
    channels_last = cfg.runtime.channels_last

    samples, cache = select_samples(data, cfg)
    train_keys, val_keys = make_validation_split(samples, val_fraction=cfg.data.val_fraction, seed=cfg.runtime.seed)
    if ctx.is_main:
        write_split_csv(out / "val_split.csv", samples, val_keys)
    preprocess = PreprocessConfig(image_size=cfg.data.image_size, geometry=cfg.data.geometry)
    if cache is None or cache.preprocess != preprocess:
        if cache is not None:
            raise ValueError(f"{data}: cache was built with {cache.preprocess}, but the run asks for {preprocess}; "
                             "rebuild it with `braintumor prepare-data` or pass the raw dataset")
        with main_first(ctx):  # rank 0 builds the cache, the others then find it and load it
            cache = prepare_cache(samples, preprocess, cfg.data.cache_dir, skip_bad=cfg.data.skip_bad,
                                  progress=cfg.runtime.progress and ctx.is_main)
    row_of = {s.key: i for i, s in enumerate(cache.samples)}
    train_rows = np.array(sorted(row_of[k] for k in train_keys if k in row_of))
    val_rows = np.array(sorted(row_of[k] for k in val_keys if k in row_of))

    dataset = SliceDataset(cache.images, cache.masks, cache.labels, build_augmentation())
    has_mask = np.array([s.has_mask for s in cache.samples])
    seg_rows = train_rows[has_mask[train_rows]]
    empty = train_rows[(~has_mask[train_rows]) & (dataset.targets[train_rows] == CLASSES.index(NO_TUMOR))]
    frac = cfg.data.seg_empty_fraction
    n_empty = min(len(empty), int(round(frac / (1 - frac) * len(seg_rows)))) if frac > 0 else 0
    seg_rows = np.sort(np.concatenate([seg_rows, np.random.default_rng(cfg.runtime.seed).permutation(empty)[:n_empty]]))

    o, seed, world = cfg.optim, cfg.runtime.seed, ctx.world_size
    if len(train_rows) < world:
        raise ValueError(f"{len(train_rows)} training slices cannot be shared by {world} ranks; use fewer processes")

    def shard(sampler):  # this rank's disjoint share of the sampler's global sequence
        return ShardedSampler(sampler, ctx.rank, world) if ctx.enabled else sampler

    bs = min(o.batch_size, len(train_rows) // world)  # per rank; one epoch is one pass of the global batch
    loader = partial(DataLoader, dataset, batch_size=bs, num_workers=cfg.data.workers, drop_last=True,
                     pin_memory=device.type == "cuda", persistent_workers=cfg.data.workers > 0)
    cls_sampler = shard(BalancedSampler(dataset.targets, train_rows, len(train_rows), seed))
    steps = {"cls": ClassificationStep("cls", loader(sampler=cls_sampler), label_smoothing=o.label_smoothing)}
    use_seg = o.lambda_seg > 0 and len(seg_rows) >= min(o.batch_size, len(seg_rows)) > 0 and len(seg_rows) >= world
    if use_seg:
        seg_bs = min(o.batch_size, len(seg_rows) // world)
        seg_sampler = shard(ShuffleSampler(seg_rows, seed + 1))
        steps["seg"] = SegmentationStep("seg", DataLoader(dataset, batch_size=seg_bs, sampler=seg_sampler,
                                                          num_workers=cfg.data.workers, drop_last=True),
                                        weight=o.lambda_seg, bce_weight=o.bce_weight, dice_weight=o.dice_weight,
                                        cam_weight=o.lambda_cam)
    schedule = TaskSchedule(o.seg_every, segmentation=use_seg)
    cls_steps = len(train_rows) // (bs * world)

    model = build_model(encoder=cfg.model.encoder, pretrained=cfg.model.pretrained, mask_stride=cfg.model.mask_stride,
                        dropout=cfg.model.dropout, preprocess=preprocess.to_dict(),
                        cam_stride=cfg.model.cam_stride, class_pool=cfg.model.class_pool,
                        class_pool_floor=cfg.model.class_pool_floor).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    steps_per_epoch = len(schedule.epoch(cls_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        _lr_lambda, warmup=int(o.warmup_epochs * steps_per_epoch), total=o.epochs * steps_per_epoch, min_ratio=o.min_lr_ratio))

    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], device if ctx.enabled else None)
        start_epoch = state["epoch"]

    run_config = cfg.model_dump(mode="json")
    # Where the initial weights came from (package, version, sha256 of the file), kept across --resume.
    init_weights = state.get("init_weights") if state is not None else model.encoder.weight_source
    extra = {"val_keys": sorted(val_keys), "data_root": str(data), "init_weights": init_weights}

    def save(path, epoch, best):
        save_checkpoint(path, model=model, run_config=run_config, epoch=epoch, optimizer=optimizer, scheduler=scheduler,
                        best_score=best, extra=extra)

    # Rank 0 alone validates and writes (history, checkpoints of the unwrapped model, user callbacks).
    validate, epoch_callbacks = None, []
    if ctx.is_main:
        if len(val_rows):
            validate = _validator(cache, val_rows, device, channels_last, o.score_dice_weight)
        epoch_callbacks = [HistoryCSV(out / "history.csv", start_epoch), Checkpointer(out, save), *(callbacks or [])]
    trainer = AlternatingTrainer(
        model, steps, schedule, cls_steps, optimizer, scheduler, device=device, amp=cfg.runtime.amp,
        channels_last=channels_last, progress=cfg.runtime.progress, dist=ctx, validate=validate,
        callbacks=epoch_callbacks,
    )
    trainer.best_score = state["best_score"] if state is not None else None
    trainer.fit(start_epoch, o.epochs)
    return out / "best.pt"

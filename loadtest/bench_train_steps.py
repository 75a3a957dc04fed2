"""Where the trainer's CPU time goes, and what buys it back: the release recipe's real training loop (the alternating
trainer, its mix of classification and segmentation steps, the uint8 cache, channels_last, AdamW) timed against
variants of it, in one run, on the same slices. A measurement, not a test; run it on an otherwise idle machine.

    python loadtest/bench_train_steps.py --data DATA [--image-size 256] [--steps 6] [--variants today workers1 ...]

Variants (each a fresh model from the same seed; img/s over ``--steps`` classification steps and the segmentation
steps the schedule puts between them, after one untimed warm-up epoch of the same length):

- ``today``: the release recipe as `braintumor train --config train/configs/release_v2.yaml` runs it (workers 0).
- ``workers1`` / ``workers2``: the data path in 1 or 2 DataLoader worker processes instead of the main process.
- ``no-augment``: no augmentation (what the augmentation costs; not a training option).
- ``frozen-bn``: every BatchNorm in eval mode with its affine parameters frozen (running statistics kept).
- ``frozen-stem``: the stem and the first two block stages frozen (no gradient, so no backward through them).
- ``compile``: ``torch.compile`` of the step module; its compile time is the warm-up epoch's extra seconds.
- ``size-S``: today's loop at S px, for a progressive-resizing schedule (small early, full size last).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

VARIANTS = ("today", "workers1", "workers2", "no-augment", "frozen-bn", "frozen-stem", "compile")


def _freeze_bn(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train = lambda mode=True, m=module: nn.Module.train(m, False)  # stays in eval mode
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)


def _freeze_stem(model: nn.Module) -> int:
    """Freeze the encoder's stem and first two block stages; the number of frozen parameters."""
    timm_model = model.encoder.model
    parts = [getattr(timm_model, name) for name in ("conv_stem", "bn1") if hasattr(timm_model, name)]
    parts += list(getattr(timm_model, "blocks", [])[:2])
    frozen = 0
    for part in parts:
        for p in part.parameters():
            p.requires_grad_(False)
            frozen += p.numel()
    if not frozen:
        raise SystemExit(f"frozen-stem: {type(timm_model).__name__} has no conv_stem/bn1/blocks")
    return frozen


def run_variant(name: str, cache, args) -> dict:
    from braintumor.train.augment import build_augmentation
    from braintumor.train.datasets import BalancedSampler, ShuffleSampler, SliceDataset
    from braintumor.train.factory import build_model
    from braintumor.train.trainer.engine import AlternatingTrainer
    from braintumor.train.trainer.schedule import TaskSchedule
    from braintumor.train.trainer.steps import ClassificationStep, SegmentationStep

    workers = {"workers1": 1, "workers2": 2}.get(name, 0)
    ds = SliceDataset(cache.images, cache.masks, cache.labels, None if name == "no-augment" else build_augmentation())
    rows = np.arange(len(ds))
    seg_rows = rows[[s.has_mask for s in cache.samples]]

    def loader(sampler):
        return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
                                           drop_last=True, persistent_workers=workers > 0)

    steps = {"cls": ClassificationStep("cls", loader(BalancedSampler(ds.targets, rows, len(rows))),
                                       label_smoothing=0.1),
             "seg": SegmentationStep("seg", loader(ShuffleSampler(seg_rows)), weight=0.5)}
    torch.manual_seed(0)
    model = build_model(args.encoder, preprocess=cache.preprocess, mask_stride=2, cam_stride=16)
    model = model.to(memory_format=torch.channels_last)
    if name == "frozen-bn":
        _freeze_bn(model)
    if name == "frozen-stem":
        _freeze_stem(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    trainer = AlternatingTrainer(model, steps, TaskSchedule(args.seg_every), args.steps, opt, sched,
                                 device=torch.device("cpu"), channels_last=True, progress=False)
    if name == "compile":
        trainer.net = torch.compile(trainer.net)
    warm = trainer.train_epoch(0)  # workers start, allocator warms; compile happens here
    logs = trainer.train_epoch(1)
    return {"variant": name, "size": cache.preprocess.image_size, "img_s": logs["train_images_per_s"],
            "epoch_s": logs["epoch_seconds"], "warm_s": warm["epoch_seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--sizes", type=int, nargs="*", default=[], help="also today's loop at these sizes (progressive)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--encoder", default="tf_efficientnet_lite0")
    p.add_argument("--seg-every", type=int, default=2, help="the release recipe's seg_every")
    p.add_argument("--steps", type=int, default=6, help="timed classification steps per variant")
    p.add_argument("--limit", type=int, default=400, help="training slices to draw batches from")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = p.parse_args()

    from braintumor.train.cache import prepare_cache
    from braintumor.train.preprocess import PreprocessConfig
    from braintumor.train.samples import build_index

    samples = build_index(args.data).split("train")[: args.limit]
    caches = {size: prepare_cache(samples, PreprocessConfig(image_size=size), progress=False)
              for size in dict.fromkeys([args.image_size, *args.sizes])}
    results = [run_variant(v, caches[args.image_size], args) for v in args.variants]
    results += [run_variant("today", caches[s], args) | {"variant": f"size-{s}"} for s in args.sizes
                if s != args.image_size]
    base = next((r for r in results if r["variant"] == "today"), results[0])
    print(f"\ntraining loop, {args.encoder}, batch {args.batch_size}, seg_every {args.seg_every} "
          f"({args.steps} classification steps + {args.steps // args.seg_every} segmentation steps timed), "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| variant | px | img/s (fwd+bwd, the recipe's mix) | vs today | warm-up epoch s (compile) |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        extra = f"{r['warm_s']:.0f} (+{r['warm_s'] - base['warm_s']:.0f})" if r["variant"] == "compile" \
            else f"{r['warm_s']:.0f}"
        print(f"| {r['variant']} | {r['size']} | {r['img_s']:.1f} | {r['img_s'] / base['img_s']:.2f}x | {extra} |")


if __name__ == "__main__":
    main()

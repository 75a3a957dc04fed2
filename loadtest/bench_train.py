"""Training throughput: our trainer (uint8 cache, channels_last, workers, one head per step) versus a plain eager
loop that decodes JPEGs every step and runs both heads, same model, resolution and batch size, in one run.

    python loadtest/bench_train.py --data ../shared/data/brisc2025 --image-size 128 --steps 12
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from braintumor.train.augment import build_augmentation
from braintumor.train.cache import prepare_cache
from braintumor.train.datasets import BalancedSampler, ShuffleSampler, SliceDataset
from braintumor.train.factory import build_model
from braintumor.train.losses import classification_loss, segmentation_loss
from braintumor.train.naming import CLASSES
from braintumor.train.decode import decode_image, decode_mask
from braintumor.train.preprocess import PreprocessConfig, preprocess, preprocess_mask
from braintumor.train.samples import build_index
from braintumor.train.trainer.engine import AlternatingTrainer
from braintumor.train.trainer.schedule import TaskSchedule
from braintumor.train.trainer.steps import ClassificationStep, SegmentationStep


def eager_baseline(samples, cfg: PreprocessConfig, args) -> float:
    """The usual loop: decode + preprocess + augment JPEGs in the main process, both heads and losses every step."""
    torch.manual_seed(0)
    model = build_model(args.encoder, preprocess=cfg, mask_stride=args.mask_stride)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    aug = build_augmentation()
    rng = np.random.default_rng(0)
    images_done, start = 0, None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        batch = rng.choice(len(samples), args.batch_size)
        xs, ms, ys = [], [], []
        for i in batch:
            s = samples[i]
            img, geom = preprocess(decode_image(s.image_path).pixels, cfg)
            mask = preprocess_mask(decode_mask(s.mask_path), geom) if s.has_mask else np.zeros_like(img)
            out = aug(image=img, mask=mask)
            xs.append(out["image"]), ms.append(out["mask"]), ys.append(CLASSES.index(s.label))
        x = torch.from_numpy(np.stack(xs))[:, None].float()
        m = torch.from_numpy(np.stack(ms))[:, None].float()
        logits, mask_logits = model(x)
        loss = classification_loss(logits, torch.tensor(ys)) + 0.3 * segmentation_loss(mask_logits, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        images_done += len(batch) if step >= args.warmup else 0
    return images_done / (time.perf_counter() - start)


def our_trainer(samples, cfg: PreprocessConfig, args) -> float:
    cache = prepare_cache(samples, cfg, progress=False)
    ds = SliceDataset(cache.images, cache.masks, cache.labels, build_augmentation())
    rows = np.arange(len(ds))
    seg_rows = rows[[s.has_mask for s in cache.samples]]
    loader = lambda sampler: torch.utils.data.DataLoader(  # noqa: E731
        ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, drop_last=True,
        persistent_workers=args.workers > 0)
    steps = {"cls": ClassificationStep("cls", loader(BalancedSampler(ds.targets, rows, len(rows)))),
             "seg": SegmentationStep("seg", loader(ShuffleSampler(seg_rows)), weight=0.3)}
    torch.manual_seed(0)
    model = build_model(args.encoder, preprocess=cfg, mask_stride=args.mask_stride).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    schedule = TaskSchedule(2)
    trainer = AlternatingTrainer(model, steps, schedule, 0, opt, sched, device=torch.device("cpu"),
                                 channels_last=True, progress=False)
    # With seg_every=2 an epoch of n classification steps has 1.5 n steps in all.
    trainer.cls_steps_per_epoch = max(2, round(args.warmup / 1.5))
    trainer.train_epoch(0)  # warm-up (workers start, allocator warms)
    trainer.cls_steps_per_epoch = max(2, round(args.steps / 1.5))
    logs = trainer.train_epoch(1)
    return logs["train_images_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--mask-stride", type=int, default=2)
    p.add_argument("--steps", type=int, default=12, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--limit", type=int, default=600, help="slices to draw batches from")
    args = p.parse_args()
    samples = build_index(args.data).split("train")[: args.limit]
    cfg = PreprocessConfig(image_size=args.image_size)
    base = eager_baseline(samples, cfg, args)
    ours = our_trainer(samples, cfg, args)
    print(f"\ntraining throughput, {args.encoder} U-Net, {args.image_size}px, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {args.steps} timed steps each")
    print(f"{'contender':<52}{'images/s':>10}{'ratio':>8}")
    print(f"{'eager loop, JPEG decode per step, both heads':<52}{base:>10.1f}{1.0:>8.2f}")
    print(f"{'alternating trainer, uint8 cache, channels_last':<52}{ours:>10.1f}{ours / base:>8.2f}")


if __name__ == "__main__":
    main()

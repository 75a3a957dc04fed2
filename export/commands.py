"""CLI subcommand of the export layer: `braintumor export` (heavy imports inside the handler)."""

from __future__ import annotations

import argparse
import sys


def _export(args: argparse.Namespace) -> int:
    from ..train.progress import progress_bar

    from .onnx_export import ParityError
    from .repository import ExportOptions, export_repository, export_steps
    from .tensorrt import TensorRTUnavailable, require_tensorrt
    from .triton_config import TritonOptions

    backend = "tensorrt" if args.tensorrt else args.backend
    if args.tensorrt and args.backend not in ("python", "tensorrt"):  # python is the default, so not a conflict
        raise ValueError(f"--tensorrt conflicts with --backend {args.backend}; pass one of them")
    triton = TritonOptions(
        max_batch_size=args.max_batch_size,
        preferred_batch_sizes=tuple(b for b in args.preferred_batch_sizes if b <= args.max_batch_size),
        max_queue_delay_us=args.max_queue_delay_us, instance_count=args.instances, instance_kind=args.instance_kind,
        warmup=args.warmup, intra_op_threads=args.intra_op_threads, inter_op_threads=args.inter_op_threads,
    )
    options = ExportOptions(name=args.name, version=args.version, backend=backend, triton=triton,
                            parity_data=args.parity_data, parity_count=args.parity_count,
                            weights_fp16=args.weights_fp16)
    if options.variant == "tensorrt_plan":  # fail in one line before loading anything
        try:
            require_tensorrt()
        except TensorRTUnavailable as exc:
            print(f"braintumor export: error: {exc}", file=sys.stderr)
            return 2
    bar = progress_bar(total=export_steps(options), unit="step", disable=args.no_progress, file=sys.stderr)

    started = []

    def progress(label: str) -> None:  # called as each step starts; the previous one is then done
        if started:
            bar.update(1)
        started.append(label)
        bar.set_description(label)

    try:
        published = export_repository(args.checkpoint, args.out, options, progress=progress)
        bar.update(bar.total - bar.n)
    except ParityError as exc:
        print(f"braintumor export: parity check failed, nothing published for this graph:\n{exc}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    for item in published:
        sizes = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in item.sizes.items())
        print(f"{item.name} v{item.version}: {item.folder} ({sizes})")
        for line in (*item.parity, *item.tensorrt_parity):
            print(f"  parity {line}")
    return 0


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="export a checkpoint to ONNX (and TensorRT) as a versioned Triton model repository, proving parity",
        description="Writes OUT/NAME and OUT/NAME_classifier with config.pbtxt, a numbered version folder, "
                    "metadata.json and a sha256 manifest. Every graph is checked against PyTorch first.",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint from `braintumor train` (RUN/best.pt)")
    p.add_argument("--out", required=True, help="Triton model repository folder to write into (created if missing)")
    p.add_argument("--name", default="brain_tumor", help="model name; the classifier-only graph is NAME_classifier")
    p.add_argument("--version", type=_positive, help="version number (default: one above the highest existing)")
    p.add_argument("--backend", choices=("python", "onnxruntime", "tensorrt"), default="python",
                   help="how Triton runs it: python (ONNX Runtime inside Triton's python backend, works with the "
                        "embedded server), onnxruntime (NVIDIA's Triton container), tensorrt (GPU FP16 plan)")
    p.add_argument("--tensorrt", action="store_true", help="shorthand for --backend tensorrt (needs tensorrt and a GPU)")
    p.add_argument("--weights-fp16", action="store_true",
                   help="store the ONNX weights as float16 behind Cast nodes: halves model.onnx (resnet18 at 128 px: "
                        "49.8 -> 24.9 MB full, 44.7 -> 22.4 MB classifier); ONNX Runtime folds the casts at load, so "
                        "compute stays fp32 at the same speed. Parity then uses looser fp16-weight tolerances "
                        "(export/fp16_storage.py); metadata.json records weights_storage")
    p.add_argument("--parity-data", help="BRISC-layout dataset root: parity runs on its real preprocessed slices "
                                         "(default: synthetic slices)")
    p.add_argument("--parity-count", type=_positive, default=8, help="images in the parity batch")
    p.add_argument("--max-batch-size", type=_positive, default=32, help="Triton max_batch_size (and TensorRT max batch)")
    p.add_argument("--preferred-batch-sizes", type=_positive, nargs="+", default=[8, 16, 32],
                   help="dynamic batching preferred sizes (those above --max-batch-size are dropped)")
    p.add_argument("--max-queue-delay-us", type=int, default=1000, help="dynamic batching max queue delay, microseconds")
    p.add_argument("--instances", type=_positive, default=1, help="model instances (instance_group count)")
    p.add_argument("--instance-kind", choices=("KIND_CPU", "KIND_GPU"),
                   help="instance kind (default: KIND_GPU for tensorrt, else KIND_CPU)")
    p.add_argument("--warmup", choices=("zero", "random", "none"), default="zero",
                   help="model warm-up request at load time")
    p.add_argument("--intra-op-threads", type=int, default=0,
                   help="python backend: ONNX Runtime intra-op threads (0 = usable CPUs / instances)")
    p.add_argument("--inter-op-threads", type=int, default=1, help="python backend: ONNX Runtime inter-op threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.set_defaults(func=_export)
    register_evaluate(sub)


def _evaluate(args: argparse.Namespace) -> int:
    import json

    if args.model_repository:
        from .evaluate import evaluate_repository

        metrics = evaluate_repository(args.model_repository, args.data, args.split, args.out, name=args.name,
                                      version=args.version, batch_size=args.batch_size)
    else:
        from ..train.evaluate import evaluate_checkpoint

        metrics = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.out, batch_size=args.batch_size)
    keys = ("accuracy", "macro_f1", "roc_auc_ovr", "ece", "dice", "iou")
    print(json.dumps({k: metrics.get(k) for k in keys}, indent=2))
    print(f"wrote {args.out}/metrics.json and {args.out}/report.html")
    return 0


def register_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="evaluate a checkpoint (PyTorch) or an exported model (ONNX Runtime): metrics.json, report.html",
                       description="Score a model on one split of a BRISC folder: classification (accuracy, macro F1, "
                                   "ROC AUC, ECE), segmentation (Dice/IoU at the model input and at the original "
                                   "resolution), the pointing game and the refer policies; writes OUT/metrics.json "
                                   "and OUT/report.html and prints the headline numbers. Either a checkpoint "
                                   "(PyTorch) or an exported repository (ONNX Runtime, no torch needed).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint from `train` (RUN/best.pt)")
    source.add_argument("--model-repository", help="a Triton model repository from `export`; scored with ONNX Runtime, "
                                                   "no torch needed")
    p.add_argument("--data", required=True, help="dataset root (BRISC layout)")
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="val: the run's own validation split (carried by the checkpoint or the exported model), "
                        "the one the model and its thresholds were chosen on; test: the dataset's official test "
                        "split, for a final figure only: evaluate it once and never choose anything on it")
    p.add_argument("--out", required=True, help="folder for metrics.json and report.html")
    p.add_argument("--name", default="brain_tumor", help="model name inside --model-repository")
    p.add_argument("--version", type=int, help="model version inside --model-repository (default: the newest)")
    p.add_argument("--batch-size", type=int, default=32, help="inference batch size")
    p.set_defaults(func=_evaluate)

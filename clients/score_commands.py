"""CLI subcommand `braintumor score`: batch-score a folder of slices against a running service (the engine is
clients/score.py, imported only when the command runs)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

API_KEY_ENV = "BRAINTUMOR_API_KEY"


def _score(args: argparse.Namespace) -> int:
    from .score import ScoreOptions, UsageError, run_score

    if args.api_key_env != API_KEY_ENV and args.api_key_env not in os.environ:
        print(f"braintumor score: error: --api-key-env {args.api_key_env}: that environment variable is not set",
              file=sys.stderr)
        return 2
    opts = ScoreOptions(input=args.input, out=args.out, fmt=args.format, masks=args.masks,
                        concurrency=args.concurrency, protocol=args.protocol, url=args.url,
                        api_key=os.environ.get(args.api_key_env) or None, timeout=args.timeout,
                        retries=args.retries, evaluate=args.evaluate, progress=not args.no_progress,
                        heatmaps=args.heatmaps)
    try:
        return run_score(opts)
    except UsageError as exc:
        print(f"braintumor score: error: {exc}", file=sys.stderr)
        return 2


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score", help="score every slice in a folder against a running service into a CSV/JSONL file (resumable)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Send every JPEG, PNG and DICOM file under INPUT (recursive, sorted; extension-less DICOM "
                    "files too) to a running `braintumor serve` and write one row per file: path relative to "
                    "INPUT, label, the probability of each class, refer and its reasons, tumour area (px, mm2) "
                    "and the model. Each row is made durable as it completes, so an interrupted run (Ctrl-C, "
                    "SIGKILL, the service going down) is resumed by running the same command again: files "
                    "already in --out are skipped, nothing is duplicated. Files that fail go to "
                    "OUT.errors.csv (path, kind, detail) and are retried by a rerun. Exit codes: 0 every file "
                    "scored, 1 some files failed, 2 usage error, 3 the service is unavailable, 130 Ctrl-C.")
    p.add_argument("input", type=Path, metavar="INPUT", help="folder of slices (or one file)")
    p.add_argument("--out", type=Path, required=True, help="results file; resumed when it exists")
    p.add_argument("--format", choices=("csv", "jsonl"), default=None,
                   help="results format (default: jsonl when --out ends in .jsonl, else csv)")
    p.add_argument("--masks", type=Path, default=None, metavar="DIR",
                   help="also write each predicted mask as a PNG (255 tumour, 0 background) under DIR, mirroring "
                        "the file's path under INPUT with the extension .png")
    p.add_argument("--heatmaps", type=Path, default=None, metavar="DIR",
                   help="also ask for each slice's Grad-CAM heatmap (RGB PNG; computed by the service only when "
                        "asked) and write it under DIR, named as --masks names the masks")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at a time")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="which front door to call")
    p.add_argument("--url", default=None,
                   help="service address (default: localhost:50051 for grpc, http://localhost:3000 for http)")
    p.add_argument("--api-key-env", default=API_KEY_ENV, metavar="VAR",
                   help="environment variable holding the API key (the key never goes on the command line); "
                        "unset: no key is sent")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per request")
    p.add_argument("--retries", type=int, default=3,
                   help="times a request is repeated after the service was unavailable (UNAVAILABLE, 502/503, connection refused)")
    p.add_argument("--evaluate", action="store_true",
                   help="INPUT has the BRISC 2025 layout (dataset root, classification_task/<split> or "
                        "segmentation_task/<split>): after scoring, print accuracy, per-class recall, the "
                        "confusion matrix and mean Dice over the slices with a ground-truth mask, computed from "
                        "--out and the predicted masks (so it also covers resumed runs), and write OUT.eval.json. "
                        "Needs the masks: without --masks they go to OUT.masks/. Score slices the model was not "
                        "trained on: the bundled model learnt from the train split, so use the test split")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_score)

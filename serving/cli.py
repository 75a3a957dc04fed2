"""The one `braintumor` command. Each layer registers its own subcommands; heavy imports happen only when one runs.

It lives in `serving` because serving is the one layer allowed to import every other (see ARCHITECTURE.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Layer modules that expose ``register(subparsers)``; import order is the help order.
COMMAND_MODULES = ("braintumor.train.commands", "braintumor.export.commands", "braintumor.serving.triton_commands",
                   "braintumor.serving.grpc_commands", "braintumor.serving.serve_command",
                   "braintumor.clients.score_commands", "braintumor.serving.loadtest_commands")

# Errors that mean "the input or the request is wrong": shown as one clear line, exit code 2, no traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="braintumor",
        description="Brain MRI tumour classification, segmentation and explanation (BRISC 2025).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _USER_ERRORS as exc:
        print(f"braintumor {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

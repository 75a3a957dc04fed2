"""The one `braintumor` command. Each layer registers its own subcommands; heavy imports happen only when one runs.

It lives in `serving` because serving is the one layer allowed to import every layer it serves (see ARCHITECTURE.md).
A layer above serving (``loadtest``, which imports serving) is not named here: it adds its commands as a plugin, an
entry point in the group ``braintumor.commands`` (pyproject.toml), so serving imports nothing of it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

# Layer modules that expose ``register(subparsers)``; import order is the help order.
COMMAND_MODULES = ("braintumor.train.commands", "braintumor.export.commands", "braintumor.serving.triton_commands",
                   "braintumor.serving.grpc_commands", "braintumor.serving.serve_command",
                   "braintumor.clients.score_commands", "braintumor.clients.pacs_commands")
# Entry points whose value is a module with ``register(subparsers)``, after the modules above (by name). An install
# may lack the module an entry point names: the gateway image ships no load-test runner (Dockerfile), so it offers no
# `loadtest`.
PLUGIN_GROUP = "braintumor.commands"

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default said once: not appended when the help already says it (``(config default 128)``) or
    when there is none to say (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


class _CommandParser(argparse.ArgumentParser):
    """Every subcommand's parser: a command that asks for argparse's defaults formatter gets :class:`HelpFormatter`."""

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("formatter_class") is argparse.ArgumentDefaultsHelpFormatter:
            kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)


# Errors that mean "the input or the request is wrong": shown as one clear line, exit code 2, no traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="braintumor",
        description="Brain MRI tumour classification, segmentation and explanation (BRISC 2025).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_CommandParser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for entry in sorted(importlib.metadata.entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            module = entry.load()
        except ModuleNotFoundError as exc:
            if exc.name is not None and (entry.module + ".").startswith(exc.name + "."):
                continue  # the plugin's layer is not installed (not: it is, and one of its imports failed)
            raise
        module.register(sub)
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

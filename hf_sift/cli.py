"""The `hf-sift` command line: one subcommand per workflow.

Each subcommand lives next to the code it drives and exposes `register(subparsers)`, which adds its parser and
sets `func` (called with the parsed namespace, returning an exit code). Modules are imported lazily so that
`hf-sift --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence


# Command name -> module providing `register`, in the order they appear in `--help`.
COMMANDS: dict[str, str] = {
    "train": "hf_sift.trainer.cli",
    "merge": "hf_sift.merging.cli",
    "negmerge": "hf_sift.merging.cli",
    "export": "hf_sift.serving_cli",
    "upgrade": "hf_sift.upgrade_cli",
}
COMMAND_MODULES: tuple[str, ...] = tuple(dict.fromkeys(COMMANDS.values()))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `hf-sift` parser; with a known `command`, only that command's module is imported."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hf-sift", description="Exact unlearning of finetuning data through model merging."
    )
    parser.add_argument("--version", action="version", version=f"hf_sift {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = (COMMANDS[command],) if command in COMMANDS else COMMAND_MODULES
    for module in modules:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

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


# (command module, providing `register`) in the order they appear in `--help`.
COMMAND_MODULES: tuple[str, ...] = ("hf_sift.trainer.cli", "hf_sift.merging.cli")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hf-sift", description="Exact unlearning of finetuning data through model merging."
    )
    parser.add_argument("--version", action="version", version=f"hf_sift {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

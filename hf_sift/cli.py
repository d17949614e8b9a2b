"""The `hf-sift` command line: one subcommand per workflow.

Each subcommand lives next to the code it drives and exposes `register(subparsers)`, which adds its parser and
sets `func` (called with the parsed namespace, returning an exit code). Modules are imported lazily, and every
command module imports torch and transformers inside its command function, so that `hf-sift --help`, `--version`
and `hf-sift COMMAND --help` stay fast.

Errors are reported on one line, `hf-sift: error: ...`, with exit code 2 for bad input (argument parsing errors and
every [`~hf_sift.SiftError`] that is a `ValueError`), 1 for a failed check ([`~hf_sift.errors.IntegrityError`]: a
digest or a file that does not match its record), for hf_sift's other errors (e.g. `ConcurrentUpdateError`: another
writer saved the artifact first) and for unexpected errors of other libraries, and 130 when interrupted. `--debug` (anywhere on
the command line) or `HF_SIFT_DEBUG=1` also prints the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import NoReturn


# Command name -> module providing `register`, in the order they appear in `--help`.
COMMANDS: dict[str, str] = {
    "train": "hf_sift.trainer.cli",
    "merge": "hf_sift.merging.cli",
    "negmerge": "hf_sift.merging.cli",
    "export": "hf_sift.serving_cli",
    "unlearn": "hf_sift.unlearn_cli",
    "verify": "hf_sift.inspect_cli",
    "info": "hf_sift.inspect_cli",
    "push": "hf_sift.hub.cli",
    "pull": "hf_sift.hub.cli",
    "upgrade": "hf_sift.upgrade_cli",
}
COMMAND_MODULES: tuple[str, ...] = tuple(dict.fromkeys(COMMANDS.values()))

DEBUG_FLAG = "--debug"
DEBUG_VARIABLE = "HF_SIFT_DEBUG"

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class OneLineErrors:
    """Argument parser mixin: a parsing error raises [`~hf_sift.errors.CommandLineError`] instead of printing the
    usage and exiting, so that `main` reports it on one line like every other error."""

    prog: str

    def error(self, message: str) -> NoReturn:
        from .errors import CommandLineError

        raise CommandLineError(f"{message} (see `{self.prog} --help`)")


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are reported on one line by `hf-sift`."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `hf-sift` parser; with a known `command`, only that command's module is imported."""
    from .version import __version__

    parser = ArgumentParser(prog="hf-sift", description="Exact unlearning of finetuning data through model merging.")
    parser.add_argument("--version", action="version", version=f"hf_sift {__version__}")
    parser.add_argument(
        DEBUG_FLAG, action="store_true", help=f"print the traceback of an error (or set {DEBUG_VARIABLE}=1)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = (COMMANDS[command],) if command in COMMANDS else COMMAND_MODULES
    for module in modules:
        importlib.import_module(module).register(subparsers)
    return parser


def exit_code(error: BaseException) -> int:
    """The exit code `hf-sift` gives for `error` (see the module docstring)."""
    from .errors import IntegrityError, SiftError

    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, IntegrityError):
        return EXIT_CHECK_FAILED
    if isinstance(error, SiftError) and isinstance(error, ValueError):  # hf_sift's errors caused by bad input
        return EXIT_BAD_INPUT
    return EXIT_CHECK_FAILED


def error_line(error: BaseException, debug: bool = False) -> str:
    """The one line `hf-sift` prints for `error`."""
    from .errors import SiftError

    if isinstance(error, KeyboardInterrupt):
        return "hf-sift: error: interrupted"
    message = " ".join(str(error).split())
    if not isinstance(error, SiftError):  # not raised by hf_sift: say where it comes from
        message = f"{type(error).__name__}: {message}" if message else type(error).__name__
        if not debug:
            message += f" (run with {DEBUG_FLAG} for the traceback)"
    return f"hf-sift: error: {message}"


CPU_PIN_MEMORY_WARNING = r"'pin_memory' argument is set as true but no accelerator is found"


def main(argv: Sequence[str] | None = None) -> int:
    """Run `hf-sift` with `argv` (default: `sys.argv[1:]`) and return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        command = next((a for a in argv if not a.startswith("-")), None)
        parser = build_parser(command)
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return EXIT_BAD_INPUT
        with warnings.catch_warnings():
            # torch says this on every CPU run of a Trainer (pinning is moot there); it is noise in a command's output
            warnings.filterwarnings("ignore", message=CPU_PIN_MEMORY_WARNING, category=UserWarning)
            return int(args.func(args) or 0)
    except SystemExit as exit_:  # --help, --version
        return exit_.code if isinstance(exit_.code, int) else (EXIT_OK if exit_.code is None else EXIT_BAD_INPUT)
    except (Exception, KeyboardInterrupt) as error:
        if debug:
            traceback.print_exc()
        print(error_line(error, debug), file=sys.stderr)
        return exit_code(error)


if __name__ == "__main__":
    sys.exit(main())

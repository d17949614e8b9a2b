"""`hf-sift upgrade`: rewrite a format-1 artifact in place as format 2 (with the plain merge P), atomically."""

from __future__ import annotations

import argparse
import sys

from .shard_size import DEFAULT_MAX_SHARD_SIZE


def register(subparsers: argparse._SubParsersAction) -> None:
    upgrade = subparsers.add_parser(
        "upgrade",
        help="add the plain merge to a merged SIFT artifact (format 2), in place",
        description=(
            "Rewrite ARTIFACT (a local folder) as format 2: the sum and masks are kept and the plain merge P is added "
            "as a transformers checkpoint, computed from the base model. The save is atomic and a compare-and-swap: "
            "a concurrent writer's change is never lost. The result equals a fresh format-2 save byte for byte."
        ),
    )
    upgrade.add_argument("artifact", help="artifact folder")
    upgrade.add_argument("--base", help="base model name or folder (default: the one the artifact records)")
    upgrade.add_argument(
        "--max-shard-size",
        "--max_shard_size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest shard of the sum and of P (default: {DEFAULT_MAX_SHARD_SIZE})",
    )
    upgrade.set_defaults(func=run_upgrade)


def run_upgrade(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .artifact import read_config
    from .errors import MissingBaseModelError, PathNotFoundError
    from .merged_delta import MergedDelta
    from .plain_merge import RECORDED_BASE

    if not Path(args.artifact).is_dir():
        raise PathNotFoundError(f"the artifact {args.artifact!r} is not a folder")
    delta = MergedDelta.from_pretrained(args.artifact)  # checks every file, the sum against its digest
    if args.base is None and delta.base_model is None:
        raise MissingBaseModelError(f"{args.artifact} does not name its base model: pass --base MODEL")
    delta.save_pretrained(args.artifact, args.max_shard_size, base=RECORDED_BASE if args.base is None else args.base)
    version = read_config(args.artifact).format_version
    if version != 2:
        print(
            f"hf-sift: error: {args.artifact} stays format {version}: its plain merge cannot be written (see the "
            "warning above)",
            file=sys.stderr,
        )
        return 1
    print(f"upgraded {args.artifact} to format 2")
    return 0

"""`hf-sift export`: write one task of a merged SIFT artifact as a plain transformers checkpoint."""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

from .shard_size import DEFAULT_MAX_SHARD_SIZE


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _device_map(text: str) -> str | dict[str, Any]:
    """A device name ("auto", "cpu", "cuda:0", ...) or a JSON object mapping module names to devices."""
    return _json_object(text) if text.lstrip().startswith("{") else text


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export",
        help="export one task of a merged SIFT artifact as a plain transformers checkpoint",
        description=(
            "Serve TASK from a merged SIFT artifact (a folder or a Hub repo id) and save it as a checkpoint that "
            "AutoModelForCausalLM.from_pretrained loads, with the artifact's tokenizer and a sift_export.json record."
        ),
    )
    export.add_argument("artifact", help="artifact folder or Hub repo id")
    export.add_argument("--task", help="task to export (default: the plain merge, no mask)")
    export.add_argument(
        "-o", "--output", required=True, help="output folder: new or empty unless --overwrite (written atomically)"
    )
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty output folder: a previous checkpoint's weights and config are replaced, other "
        "files kept (never a folder that is, holds or lies inside the artifact or the base model)",
    )
    export.add_argument("--revision", help="branch, tag or commit of the artifact's Hub repo")
    export.add_argument("--dtype", help="dtype of the exported weights (default: the one the merge was built on)")
    export.add_argument(
        "--base-model", "--base_model", help="base model name or folder (default: the one the artifact records)"
    )
    export.add_argument("--scale", type=float, help="scale of the merged update (default: 1/T)")
    export.add_argument(
        "--allow-base-mismatch",
        "--allow_base_mismatch",
        action="store_true",
        help="serve on a base whose weights differ from the recorded",
    )
    export.add_argument(
        "--no-verify", "--no_verify", action="store_true", help="skip the check of the sum against its digest"
    )
    export.add_argument(
        "--device-map",
        "--device_map",
        type=_device_map,
        help='device_map of the base model: "auto", "cpu", a device, or a JSON object of module names to devices',
    )
    export.add_argument(
        "--model-kwargs",
        "--model_kwargs",
        type=_json_object,
        help='more arguments for transformers\' from_pretrained of the base, as JSON (e.g. \'{"attn_implementation": "eager"}\')',
    )
    export.add_argument(
        "--max-shard-size",
        "--max_shard_size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest output shard (default: {DEFAULT_MAX_SHARD_SIZE})",
    )
    export.add_argument("--cache-dir", "--cache_dir", help="huggingface_hub cache folder")
    export.add_argument(
        "--local-files-only", "--local_files_only", action="store_true", help="do not download anything"
    )
    export.set_defaults(func=run_export)


def _recorded_base(artifact: str) -> str | None:
    """The base model a local artifact records (read without validating the artifact: loading it does that)."""
    from pathlib import Path

    try:
        value = json.loads((Path(artifact) / "sift_config.json").read_text()).get("base_model")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def run_export(args: argparse.Namespace) -> int:
    from .hub.sources import hub_lookup
    from .masked_model import MergedMaskedModel
    from .output_dir import check_output_dir

    inputs = [args.artifact, args.base_model, _recorded_base(args.artifact)]
    check_output_dir(args.output, inputs, overwrite=args.overwrite, flag="--output")

    hub = {k: v for k, v in (("cache_dir", args.cache_dir), ("local_files_only", args.local_files_only)) if v}
    base = args.base_model or inputs[2]
    lookup = hub_lookup(base, "the base model") if base is not None else contextlib.nullcontext()
    with lookup:
        model = MergedMaskedModel.from_pretrained(
            args.artifact,
            task=args.task,
            revision=args.revision,
            dtype=args.dtype,
            device_map=args.device_map,
            base_model=args.base_model,
            keep_delta=False,
            scale=args.scale,
            allow_base_mismatch=args.allow_base_mismatch,
            verify=not args.no_verify,
            model_kwargs=args.model_kwargs,
            **hub,
        )
    model.save_pretrained(args.output, max_shard_size=args.max_shard_size)
    served = "the plain merge" if args.task is None else f"task {args.task!r}"
    print(f"exported {served} of {args.artifact} to {args.output}")
    return 0

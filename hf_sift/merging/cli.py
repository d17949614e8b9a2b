"""`hf-sift merge` and `hf-sift negmerge`."""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..shard_size import DEFAULT_MAX_SHARD_SIZE
from . import BUILTIN_METHODS


def register(subparsers: argparse._SubParsersAction) -> None:
    merge = subparsers.add_parser(
        "merge",
        help="merge finetuned checkpoints into one transformers checkpoint",
        description=(
            "Merge finetuned checkpoints of BASE with one method, streaming tensor by tensor. With --method sift the "
            "output is a SIFT artifact (int64 sum, masks, sift_config.json) that hf-sift export serves."
        ),
    )
    merge.add_argument("--method", required=True, choices=sorted(BUILTIN_METHODS), help="merge method")
    merge.add_argument("--base", required=True, help="base checkpoint folder")
    merge.add_argument("models", nargs="+", metavar="MODEL", help="finetuned checkpoint folders")
    merge.add_argument(
        "-o", "--output", required=True, help="output folder: new or empty unless --overwrite (written atomically)"
    )
    merge.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty output folder (never one that is, holds or lies inside an input)",
    )
    merge.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter")
    merge.add_argument("--task-ids", "--task_ids", help="comma-separated ids, one per model (default: folder names)")
    merge.add_argument(
        "--include",
        action="append",
        default=[],
        help="regex of tensors to merge (default: all; for sift all but input embeddings and the LM head)",
    )
    merge.add_argument("--exclude", action="append", default=[], help="regex of tensors copied from the base")
    merge.add_argument(
        "--max-shard-size",
        "--max_shard_size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest output shard (default: {DEFAULT_MAX_SHARD_SIZE})",
    )
    merge.set_defaults(func=run_merge)

    neg = subparsers.add_parser(
        "negmerge",
        help="unlearn a forget set with NegMerge",
        description="Finetune candidates on a forget set over a grid, negate their sign consensus, search λ.",
    )
    neg.add_argument("--model", required=True, help="checkpoint folder (or Hub repo id) of the model to unlearn from")
    neg.add_argument("--forget-data", "--forget_data", required=True, help="JSON / JSON lines file of the forget set")
    neg.add_argument("--retain-data", "--retain_data", required=True, help="JSON / JSON lines file of the retain set")
    neg.add_argument(
        "--text-template",
        "--text_template",
        default="{question} {answer}",
        help="Python format string of one row, over its columns (default: '{question} {answer}')",
    )
    neg.add_argument("--max-length", "--max_length", type=int, default=128, help="token limit per row")
    neg.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="ARG=V1,V2",
        help="TrainingArguments field and its values (repeat; default learning_rate=1e-5,5e-5,1e-4)",
    )
    neg.add_argument(
        "--train-arg", "--train_arg", action="append", default=[], metavar="ARG=VALUE", help="shared TrainingArguments"
    )
    neg.add_argument("--scalings", default="0.25,0.5,0.75,1,1.5,2", help="λ grid, comma-separated")
    neg.add_argument(
        "--retain-fraction", "--retain_fraction", type=float, default=0.95, help="retain metric kept (default 0.95)"
    )
    neg.add_argument("--eval-batch-size", "--eval_batch_size", type=int, default=8)
    neg.add_argument(
        "-o",
        "--output",
        required=True,
        help="output folder of the unlearned checkpoint: new or empty unless --overwrite",
    )
    neg.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty output folder (never one that is, holds or lies inside an input)",
    )
    neg.set_defaults(func=run_negmerge)


def run_merge(args: argparse.Namespace) -> int:
    from ..output_dir import check_output_dir
    from ..selection import ParameterSelection
    from .checkpoint_merge import merge_checkpoints
    from .registry import get_method, parse_params

    check_output_dir(args.output, [args.base, *args.models], overwrite=args.overwrite, flag="--output")
    method_class = get_method(args.method)
    params = parse_params(method_class, args.param)
    selection = None  # each method's default: every floating-point tensor, or P for sift
    if args.include or args.exclude:
        selection = ParameterSelection(include=tuple(args.include), exclude=tuple(args.exclude))
    task_ids = [t.strip() for t in args.task_ids.split(",")] if args.task_ids else None
    result = merge_checkpoints(
        method_class(**params),
        args.base,
        args.models,
        args.output,
        task_ids=task_ids,
        parameters=selection,
        max_shard_size=args.max_shard_size,
    )
    print(f"merged {len(args.models)} model(s) with {args.method} into {result.output_dir}")
    return 0


def parse_scalings(text: str, flag: str = "--scalings") -> list[float]:
    """The λ grid: comma-separated finite numbers."""
    from ..errors import InvalidMergeParameterError

    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise InvalidMergeParameterError(f"{flag} {text!r}: {part!r} is not a number") from None
        if not math.isfinite(value):
            raise InvalidMergeParameterError(f"{flag} {text!r}: λ must be finite, got {part!r}")
        values.append(value)
    if not values:
        raise InvalidMergeParameterError(f"{flag} {text!r} holds no value; give comma-separated numbers")
    return values


def _training_arguments(
    items: list[str], flag: str, split_values: bool, reserved: frozenset[str] = frozenset({"output_dir"})
) -> dict[str, Any]:
    """`ARG=VALUE` (or `ARG=V1,V2` with `split_values`) items, each value converted to the type of the
    `TrainingArguments` field `ARG` as its own command-line flag would be (through `HfArgumentParser`)."""
    import dataclasses

    from transformers import HfArgumentParser, TrainingArguments

    from ..errors import CommandLineError, InvalidMergeParameterError

    class FieldParser(HfArgumentParser):
        def error(self, message: str):
            raise CommandLineError(message)

    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    parser = FieldParser(TrainingArguments)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InvalidMergeParameterError(f"{flag} {item!r}: expected ARG=VALUE")
        if key not in fields:
            raise InvalidMergeParameterError(f"{flag} {item!r}: {key!r} is not a TrainingArguments field")
        if key in reserved:
            raise InvalidMergeParameterError(f"{flag} {item!r}: negmerge sets {key} itself")
        texts = [v.strip() for v in text.split(",")] if split_values else [text.strip()]
        values = []
        for value in texts:
            try:
                namespace, _ = parser.parse_known_args([f"--{key}", value])
            except CommandLineError as err:
                raise InvalidMergeParameterError(f"{flag} {item!r}: {err}") from None
            values.append(getattr(namespace, key))
        out[key] = values if split_values else values[0]
    return out


def _check_candidates(grid: dict[str, list[Any]], shared: dict[str, Any]) -> None:
    """Build the `TrainingArguments` of every grid point once, so a refused combination fails before training."""
    import tempfile

    from transformers import TrainingArguments

    from ..errors import InvalidMergeParameterError
    from .negmerge_driver import expand_grid

    with tempfile.TemporaryDirectory(prefix="hf_sift-negmerge-check-") as scratch:
        for point in expand_grid(grid):
            try:
                TrainingArguments(output_dir=scratch, **{**shared, **point})
            except (TypeError, ValueError) as err:
                message = " ".join(str(err).split())
                raise InvalidMergeParameterError(
                    f"--grid/--train-arg: TrainingArguments refuses {point}: {message}"
                ) from None


def run_negmerge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import PathNotFoundError
    from ..hub.sources import check_source, hub_lookup
    from ..output_dir import check_output_dir
    from ..text_template import check_text_template, render_text_template

    check_source(args.model, "--model")
    for flag, path in (("--forget-data", args.forget_data), ("--retain-data", args.retain_data)):
        if not Path(path).is_file():
            raise PathNotFoundError(f"{flag} {path!r}: no such file")
    check_output_dir(
        args.output, [args.model, args.forget_data, args.retain_data], overwrite=args.overwrite, flag="--output"
    )
    scalings = parse_scalings(args.scalings)
    grid = _training_arguments(args.grid, "--grid", split_values=True) or {"learning_rate": [1e-5, 5e-5, 1e-4]}
    shared = _training_arguments(args.train_arg, "--train-arg", split_values=False)
    from .negmerge_driver import DEFAULT_TRAINING_ARGUMENTS

    _check_candidates(grid, {**DEFAULT_TRAINING_ARGUMENTS, **shared})

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

    from ..remote_code import refuse_remote_code
    from .negmerge_driver import loss_evaluator, negmerge_unlearn

    with hub_lookup(args.model, "--model"):
        refuse_remote_code(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def tokenized(path: str):
        data = load_dataset("json", data_files=path, split="train")
        check_text_template(args.text_template, data.column_names, "--text-template")
        return data.map(
            lambda row: tokenizer(
                render_text_template(args.text_template, row), truncation=True, max_length=args.max_length
            ),
            remove_columns=data.column_names,
        )

    forget, retain = tokenized(args.forget_data), tokenized(args.retain_data)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    with hub_lookup(args.model, "--model"):
        model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=False)
    result = negmerge_unlearn(
        model,
        forget,
        loss_evaluator(forget, retain, collator, args.eval_batch_size),
        args.output,
        grid=grid,
        scalings=scalings,
        retain_fraction=args.retain_fraction,
        training_args=shared,
        data_collator=collator,
        processing_class=tokenizer,
    )
    print(
        f"NegMerge: {len(result.candidates)} candidates, consensus {result.consensus_fraction:.2%}, "
        f"λ = {result.scaling}; saved to {result.output_dir}"
    )
    return 0

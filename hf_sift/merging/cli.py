"""`hf-sift merge` and `hf-sift negmerge`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..shard_size import DEFAULT_MAX_SHARD_SIZE


def register(subparsers: argparse._SubParsersAction) -> None:
    merge = subparsers.add_parser(
        "merge",
        help="merge finetuned checkpoints into one transformers checkpoint",
        description=(
            "Merge finetuned checkpoints of BASE with one method, streaming tensor by tensor. With --method sift the "
            "output is a SIFT artifact (int64 sum, masks, sift_config.json) that hf-sift export serves."
        ),
    )
    from .registry import available_methods

    merge.add_argument("--method", required=True, choices=available_methods(), help="merge method")
    merge.add_argument("--base", required=True, help="base checkpoint folder")
    merge.add_argument("models", nargs="+", metavar="MODEL", help="finetuned checkpoint folders")
    merge.add_argument("-o", "--output", required=True, help="output folder (replaced atomically)")
    merge.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter")
    merge.add_argument("--task-ids", help="comma-separated ids, one per model (default: folder names)")
    merge.add_argument(
        "--include",
        action="append",
        default=[],
        help="regex of tensors to merge (default: all; for sift all but input embeddings and the LM head)",
    )
    merge.add_argument("--exclude", action="append", default=[], help="regex of tensors copied from the base")
    merge.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest output shard (default: {DEFAULT_MAX_SHARD_SIZE})",
    )
    merge.set_defaults(func=run_merge)

    neg = subparsers.add_parser(
        "negmerge",
        help="unlearn a forget set with NegMerge",
        description="Finetune candidates on a forget set over a grid, negate their sign consensus, search λ.",
    )
    neg.add_argument("--model", required=True, help="checkpoint folder of the model to unlearn from")
    neg.add_argument("--forget-data", required=True, help="JSON / JSON lines file of the forget set")
    neg.add_argument("--retain-data", required=True, help="JSON / JSON lines file of the retain set")
    neg.add_argument("--text-template", default="{question} {answer}", help="Python format string of one row")
    neg.add_argument("--max-length", type=int, default=128, help="token limit per row")
    neg.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="ARG=V1,V2",
        help="TrainingArguments field and its values (repeat; default learning_rate=1e-5,5e-5,1e-4)",
    )
    neg.add_argument("--train-arg", action="append", default=[], metavar="ARG=VALUE", help="shared TrainingArguments")
    neg.add_argument("--scalings", default="0.25,0.5,0.75,1,1.5,2", help="λ grid, comma-separated")
    neg.add_argument("--retain-fraction", type=float, default=0.95, help="retain metric kept (default 0.95)")
    neg.add_argument("--eval-batch-size", type=int, default=8)
    neg.add_argument("-o", "--output", required=True, help="output folder of the unlearned checkpoint")
    neg.set_defaults(func=run_negmerge)


def run_merge(args: argparse.Namespace) -> int:
    from ..selection import ParameterSelection
    from .checkpoint_merge import merge_checkpoints
    from .registry import get_method, parse_params

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


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, booleans), the raw string otherwise."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _assignments(items: list[str], split_values: bool) -> dict[str, Any]:
    from .registry import InvalidMergeParameterError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise InvalidMergeParameterError(f"expected KEY=VALUE, got {item!r}")
        key = key.strip().replace("-", "_")
        out[key] = [parse_value(v.strip()) for v in text.split(",")] if split_values else parse_value(text.strip())
    return out


def run_negmerge(args: argparse.Namespace) -> int:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

    from ..remote_code import refuse_remote_code
    from .negmerge_driver import loss_evaluator, negmerge_unlearn

    refuse_remote_code(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def tokenized(path: str):
        data = load_dataset("json", data_files=path, split="train")
        return data.map(
            lambda row: tokenizer(args.text_template.format(**row), truncation=True, max_length=args.max_length),
            remove_columns=data.column_names,
        )

    forget, retain = tokenized(args.forget_data), tokenized(args.retain_data)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=False)
    result = negmerge_unlearn(
        model,
        forget,
        loss_evaluator(forget, retain, collator, args.eval_batch_size),
        args.output,
        grid=_assignments(args.grid, split_values=True) or {"learning_rate": [1e-5, 5e-5, 1e-4]},
        scalings=[float(s) for s in args.scalings.split(",") if s.strip()],
        retain_fraction=args.retain_fraction,
        training_args=_assignments(args.train_arg, split_values=False),
        data_collator=collator,
        processing_class=tokenizer,
    )
    print(
        f"NegMerge: {len(result.candidates)} candidates, consensus {result.consensus_fraction:.2%}, "
        f"λ = {result.scaling}; saved to {result.output_dir}"
    )
    return 0

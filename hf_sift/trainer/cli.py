"""`hf-sift train`: SIFT-train every task of a dataset into one merged artifact.

Every field of [`SIFTConfig`] (so every `TrainingArguments` flag) is accepted, e.g.

```bash
hf-sift train --model HuggingFaceTB/SmolLM2-135M-Instruct --data tofu.jsonl --task_column author \\
    --text_template "Question: {question}\\nAnswer: {answer}" --artifact_dir merged --output_dir runs \\
    --max_steps 20 --per_device_train_batch_size 8 --learning_rate 1e-5 --sign_seed 0
```

Under `accelerate launch`, tasks are sharded over the processes (see docs/trainer.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from ..errors import SiftError, UnsupportedDataError


@dataclass
class TrainDataArguments:
    """What to train: the model, the data and where the merged artifact goes."""

    model: str = field(metadata={"help": "Model name or local path (loaded with AutoModelForCausalLM)."})
    data: str = field(metadata={"help": "Training data: a JSON-lines, JSON, CSV or Parquet file."})
    artifact_dir: str = field(metadata={"help": "Folder of the merged SIFT artifact (created or continued)."})
    task_column: str = field(default="task", metadata={"help": "Column holding each example's task id."})
    text_template: str = field(
        default="{text}", metadata={"help": "Python format string building each example's text from its columns."}
    )
    max_length: int = field(default=256, metadata={"help": "Tokens per example (truncated and padded)."})
    tasks: list[str] = field(default_factory=list, metadata={"help": "Train only these tasks (default: all)."})


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="SIFT-train every task of a dataset into one merged artifact",
        description=__doc__.split("\n\n")[0],
        add_help=False,
        prefix_chars="+",  # every flag goes through to HfArgumentParser untouched
    )
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="see `hf-sift train --help`")
    parser.set_defaults(func=run)


def _parser():
    from transformers import HfArgumentParser

    from .sift_config import SIFTConfig

    return HfArgumentParser((TrainDataArguments, SIFTConfig), prog="hf-sift train")


def run(namespace: argparse.Namespace) -> int:
    parser = _parser()
    argv = list(namespace.arguments)
    if not argv or "-h" in argv or "--help" in argv:
        parser.print_help()
        return 0
    data_args, config = parser.parse_args_into_dataclasses(argv)
    try:
        return train_from_arguments(data_args, config)
    except SiftError as err:
        print(f"hf-sift: error: {err}", file=sys.stderr)
        return 2


DATA_BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}


def load_data(path: str) -> Any:
    """A `datasets.Dataset` from a JSON-lines, JSON, CSV or Parquet file, or a folder saved by `save_to_disk`."""
    import datasets

    if os.path.isdir(path):
        return datasets.load_from_disk(path)
    builder = DATA_BUILDERS.get(path.rsplit(".", 1)[-1].lower())
    if builder is None:
        raise UnsupportedDataError(
            f"unsupported data file {path!r}: use JSON lines, JSON, CSV, Parquet or a saved datasets folder"
        )
    if not os.path.isfile(path):
        raise UnsupportedDataError(f"no data file {path!r}")
    return datasets.load_dataset(builder, data_files=path, split="train")


def load_tokenizer(model: str) -> Any:
    """The model's tokenizer, padding with EOS where it has no pad token (as `hf-sift train` trains with)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_rows(raw: Any, tokenizer: Any, text_template: str, max_length: int, task_column: str) -> Any:
    """Each row's text from `text_template`, tokenized to `max_length` (padded), labels on the real tokens."""
    if task_column not in raw.column_names:
        raise UnsupportedDataError(f"the data has no task column {task_column!r}: {raw.column_names}")

    def tokenize(row):
        try:
            text = text_template.format(**row)
        except KeyError as err:
            raise UnsupportedDataError(f"the text template names {err}, not a column of {raw.column_names}") from None
        enc = tokenizer(text, max_length=max_length, truncation=True, padding="max_length")
        enc["labels"] = [t if m else -100 for t, m in zip(enc["input_ids"], enc["attention_mask"])]
        return enc

    return raw.map(tokenize, remove_columns=[c for c in raw.column_names if c != task_column])


def train_from_arguments(data_args: TrainDataArguments, config) -> int:
    from transformers import AutoModelForCausalLM

    from .train_tasks import train_tasks

    raw = load_data(data_args.data)
    tokenizer = load_tokenizer(data_args.model)
    data = tokenize_rows(raw, tokenizer, data_args.text_template, data_args.max_length, data_args.task_column)
    model = AutoModelForCausalLM.from_pretrained(data_args.model, trust_remote_code=False)
    delta = train_tasks(
        model,
        data,
        data_args.task_column,
        config,
        data_args.artifact_dir,
        tasks=data_args.tasks or None,
        processing_class=tokenizer,
        base_model=data_args.model,
    )
    if delta is not None:
        print(f"{delta.num_tasks} task(s) merged into {data_args.artifact_dir} (delta {delta.digest})")
    return 0

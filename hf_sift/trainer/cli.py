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
from dataclasses import dataclass, field


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
    return train_from_arguments(data_args, config)


def train_from_arguments(data_args: TrainDataArguments, config) -> int:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..remote_code import refuse_remote_code
    from .train_tasks import train_tasks

    suffix = data_args.data.rsplit(".", 1)[-1].lower()
    builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(suffix)
    if builder is None:
        raise ValueError(f"unsupported data file {data_args.data!r}: use JSON lines, JSON, CSV or Parquet")
    raw = datasets.load_dataset(builder, data_files=data_args.data, split="train")
    refuse_remote_code(data_args.model)
    tokenizer = AutoTokenizer.from_pretrained(data_args.model, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def tokenize(row):
        enc = tokenizer(
            data_args.text_template.format(**row),
            max_length=data_args.max_length,
            truncation=True,
            padding="max_length",
        )
        enc["labels"] = [t if m else -100 for t, m in zip(enc["input_ids"], enc["attention_mask"])]
        return enc

    keep = {data_args.task_column}
    data = raw.map(tokenize, remove_columns=[c for c in raw.column_names if c not in keep])
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

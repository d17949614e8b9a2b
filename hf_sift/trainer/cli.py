"""`hf-sift train`: SIFT-train every task of a dataset into one merged artifact.

Every field of [`SIFTConfig`] (so every `TrainingArguments` flag) is accepted, with dashes or underscores
(`--task-column` or `--task_column`), e.g.

```bash
hf-sift train --model HuggingFaceTB/SmolLM2-135M-Instruct --data tofu.jsonl --task-column author \\
    --text-template "Question: {question}\\nAnswer: {answer}" --artifact-dir merged \\
    --max-steps 20 --per-device-train-batch-size 8 --learning-rate 1e-5 --sign-seed 0
```

Without `--output-dir`, the Trainer's run state goes to a temporary folder removed at the end.

Under `accelerate launch`, tasks are sharded over the processes (see docs/trainer.md).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


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
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Write the artifact into a non-empty folder that is not a SIFT artifact (its files are kept). "
            "An existing artifact is continued without it."
        },
    )


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
    # The flags come from the dataclasses through HfArgumentParser, which imports transformers (and
    # TrainingArguments imports torch): `hf-sift train --help` cannot be as fast as the other commands' help.
    from transformers import HfArgumentParser

    from ..cli import OneLineErrors
    from .sift_config import SIFTConfig

    class TrainArgumentParser(OneLineErrors, HfArgumentParser):
        pass

    # No abbreviations: `--output_dir` must be recognisable to tell whether it was given (see `run`).
    return TrainArgumentParser((TrainDataArguments, SIFTConfig), prog="hf-sift train", allow_abbrev=False)


def _given(argv: list[str], field_name: str) -> bool:
    """Whether a flag of `field_name` (underscore or dash spelling, `--flag value` or `--flag=value`) is in `argv`."""
    spellings = {f"--{field_name}", f"--{field_name.replace('_', '-')}"}
    return any(a.split("=", 1)[0] in spellings for a in argv)


def run(namespace: argparse.Namespace) -> int:
    from ..errors import CommandLineError

    parser = _parser()
    argv = list(namespace.arguments)
    if not argv or "-h" in argv or "--help" in argv:
        parser.print_help()
        return 0
    with tempfile.TemporaryDirectory(prefix="hf_sift-train-") as scratch:
        if not _given(argv, "output_dir"):  # the Trainer's run state goes to a temp folder, not ./trainer_output
            argv = [*argv, "--output_dir", scratch]
        try:
            data_args, config, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
        except (ValueError, TypeError) as err:  # TrainingArguments refusing a value or a combination of values
            if isinstance(err, CommandLineError):
                raise
            raise CommandLineError(f"{err} (see `hf-sift train --help`)") from err
        if unknown:
            raise CommandLineError(f"unrecognized arguments: {' '.join(unknown)} (see `hf-sift train --help`)")
        return train_from_arguments(data_args, config)


def train_from_arguments(data_args: TrainDataArguments, config) -> int:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..artifact import CONFIG_NAME
    from ..errors import CommandLineError, PathNotFoundError
    from ..hub.sources import check_source, hub_lookup
    from ..output_dir import check_output_dir
    from ..remote_code import refuse_remote_code
    from ..text_template import check_text_template, render_text_template
    from .train_tasks import train_tasks

    suffix = data_args.data.rsplit(".", 1)[-1].lower()
    builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(suffix)
    if builder is None:
        raise CommandLineError(
            f"--data {data_args.data!r}: unsupported file type; use JSON lines, JSON, CSV or Parquet"
        )
    if not Path(data_args.data).is_file():
        raise PathNotFoundError(f"--data {data_args.data!r}: no such file")
    check_source(data_args.model, "--model")
    artifact = Path(data_args.artifact_dir)
    # An existing artifact is continued (resumed); the artifact writer keeps any other file of the folder.
    check_output_dir(
        artifact,
        [data_args.model, data_args.data],
        overwrite=data_args.overwrite,
        flag="--artifact-dir",
        may_continue=(artifact / CONFIG_NAME).is_file(),
    )
    check_output_dir(
        config.output_dir, [data_args.model, data_args.data, artifact], overwrite=True, flag="--output-dir"
    )
    raw = datasets.load_dataset(builder, data_files=data_args.data, split="train")
    if data_args.task_column not in raw.column_names:
        raise CommandLineError(
            f"--task-column {data_args.task_column!r}: the data has no such column; its columns are {raw.column_names}"
        )
    check_text_template(data_args.text_template, raw.column_names, "--text-template")
    with hub_lookup(data_args.model, "--model"):
        refuse_remote_code(data_args.model)
        tokenizer = AutoTokenizer.from_pretrained(data_args.model, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def tokenize(row):
        enc = tokenizer(
            render_text_template(data_args.text_template, row, "--text-template"),
            max_length=data_args.max_length,
            truncation=True,
            padding="max_length",
        )
        enc["labels"] = [t if m else -100 for t, m in zip(enc["input_ids"], enc["attention_mask"])]
        return enc

    keep = {data_args.task_column}
    data = raw.map(tokenize, remove_columns=[c for c in raw.column_names if c not in keep])
    with hub_lookup(data_args.model, "--model"):
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

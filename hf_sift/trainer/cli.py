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
from typing import Any


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


DATA_BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}


def check_data_path(path: str, flag: str = "--data", folders: bool = False) -> None:
    """Refuse a data path that is not a JSON-lines, JSON, CSV or Parquet file (or, with `folders`, a saved dataset)."""
    from ..errors import CommandLineError, PathNotFoundError

    if folders and Path(path).is_dir():
        return
    if DATA_BUILDERS.get(path.rsplit(".", 1)[-1].lower()) is None:
        kinds = (
            "JSON lines, JSON, CSV, Parquet or a saved datasets folder"
            if folders
            else "JSON lines, JSON, CSV or Parquet"
        )
        raise CommandLineError(f"{flag} {path!r}: unsupported file type; use {kinds}")
    if not Path(path).is_file():
        raise PathNotFoundError(f"{flag} {path!r}: no such file")


def load_data(path: str, flag: str = "--data", folders: bool = False) -> Any:
    """The `datasets.Dataset` of a data file (or, with `folders`, of a folder saved by `save_to_disk`)."""
    import datasets

    check_data_path(path, flag, folders)
    if folders and Path(path).is_dir():
        return datasets.load_from_disk(path)
    return datasets.load_dataset(DATA_BUILDERS[path.rsplit(".", 1)[-1].lower()], data_files=path, split="train")


def load_tokenizer(model: str, flag: str = "--model", revision: str | None = None, **hub_kwargs: Any) -> Any:
    """The model's tokenizer (no remote code), padding with EOS where it has no pad token.

    `hub_kwargs` (`cache_dir`, `token`) go to the Hub downloads.
    """
    from transformers import AutoTokenizer

    from ..hub.sources import hub_lookup
    from ..remote_code import refuse_remote_code

    with hub_lookup(model, flag):
        refuse_remote_code(model, revision, **hub_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=False, **hub_kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_columns(raw: Any, task_column: str, text_template: str) -> None:
    """Refuse data without the task column, or a template naming a column the data lacks."""
    from ..errors import CommandLineError
    from ..text_template import check_text_template

    if task_column not in raw.column_names:
        raise CommandLineError(
            f"--task-column {task_column!r}: the data has no such column; its columns are {raw.column_names}"
        )
    check_text_template(text_template, raw.column_names, "--text-template")


def tokenize_rows(raw: Any, tokenizer: Any, text_template: str, max_length: int, task_column: str) -> Any:
    """Each row's text from `text_template`, tokenized to `max_length` (padded), labels on the real tokens; the
    task column is kept, the others dropped. `hf-sift train` and `hf-sift unlearn` build their rows with it."""
    from ..text_template import render_text_template

    check_columns(raw, task_column, text_template)

    def tokenize(row):
        enc = tokenizer(
            render_text_template(text_template, row, "--text-template"),
            max_length=max_length,
            truncation=True,
            padding="max_length",
        )
        enc["labels"] = [t if m else -100 for t, m in zip(enc["input_ids"], enc["attention_mask"])]
        return enc

    return raw.map(tokenize, remove_columns=[c for c in raw.column_names if c != task_column])


def train_from_arguments(data_args: TrainDataArguments, config) -> int:
    from transformers import AutoModelForCausalLM

    from ..artifact import CONFIG_NAME
    from ..hub.sources import check_source, hub_lookup, is_hub_source
    from ..output_dir import check_output_dir
    from .multi_task import train_tasks

    check_data_path(data_args.data)
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
    raw = load_data(data_args.data)
    check_columns(raw, data_args.task_column, data_args.text_template)
    revision = None
    if is_hub_source(data_args.model):  # pin one commit: tokenizer and model come from it, and the artifact records it
        from huggingface_hub import constants, resolve_revision
        from huggingface_hub.errors import RevisionResolutionError

        with hub_lookup(data_args.model, "--model"):
            try:
                revision = resolve_revision(data_args.model, local_files_only=constants.HF_HUB_OFFLINE).resolved
            except RevisionResolutionError:  # neither reachable nor cached: the loads below say so, as before
                revision = None
    tokenizer = load_tokenizer(data_args.model, revision=revision)
    data = tokenize_rows(raw, tokenizer, data_args.text_template, data_args.max_length, data_args.task_column)
    with hub_lookup(data_args.model, "--model"):
        model = AutoModelForCausalLM.from_pretrained(data_args.model, revision=revision, trust_remote_code=False)
    delta = train_tasks(
        model,
        data,
        data_args.task_column,
        config,
        data_args.artifact_dir,
        tasks=data_args.tasks or None,
        processing_class=tokenizer,
        base_model=data_args.model,
        base_revision=revision,
    )
    if delta is not None:
        print(f"{delta.num_tasks} task(s) merged into {data_args.artifact_dir} (delta {delta.digest})")
    return 0

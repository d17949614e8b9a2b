"""`hf-sift unlearn`: remove tasks from a merged artifact exactly (replayed and checked, or from a private store).

```bash
hf-sift unlearn merged --task alice --task bob --base HuggingFaceTB/SmolLM2-135M-Instruct --data tofu.jsonl \\
    --task-column author --text-template "Question: {question}\\nAnswer: {answer}" --max-length 128
```

The data, template and max length are those `hf-sift train` was given; each task's rows are checked against the
recorded ones before anything is trained. Exit 0 when the tasks were removed, 1 when a replay did not reproduce
its recorded task vector, 2 for bad input (nothing is changed in either case).

With a Hub repo id, the files of the branch head are read at that one commit, and the result is published as one
commit from it, then the branch's history is squashed (`--keep-history` keeps it); see docs/hub.md. Exit 1 also when
the branch moved meanwhile (nothing changed: run it again) or when the squash failed after the commit landed.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "unlearn",
        help="remove tasks from a merged SIFT artifact exactly",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
    )
    parser.add_argument(
        "artifact",
        help="the artifact folder (rewritten atomically), or a Hub repo id (one commit, then the history is squashed)",
    )
    parser.add_argument("--task", action="append", required=True, help="a task to remove (repeat for several)")
    parser.add_argument(
        "--base",
        help="base model name or folder, and its tokenizer (default: the base the artifact records, at its recorded "
        "commit, with the tokenizer saved with the artifact)",
    )
    parser.add_argument("--data", help="the training data: JSON lines, JSON, CSV, Parquet or a saved datasets folder")
    parser.add_argument("--task-column", "--task_column", default="task", help="column of each row's task id")
    parser.add_argument(
        "--text-template", "--text_template", default="{text}", help="the text template `hf-sift train` used"
    )
    parser.add_argument(
        "--max-length", "--max_length", type=int, default=256, help="the max length `hf-sift train` used"
    )
    parser.add_argument(
        "--task-vector-store",
        "--task_vector_store",
        help="private store of the tasks' exact task vectors: remove them from there, without training",
    )
    parser.add_argument("--redact", action="store_true", help="log only a salted hash of each task id")
    parser.add_argument("--dry-run", "--dry_run", action="store_true", help="only check, and print the replay cost")
    parser.add_argument(
        "--allow-environment-mismatch",
        "--allow_environment_mismatch",
        action="store_true",
        help="replay even where the environment differs from the recorded one (the digest check still guards)",
    )
    hub = parser.add_argument_group("for a Hub repo id")
    hub.add_argument("--revision", help="the branch to read and commit to (default: main)")
    hub.add_argument(
        "--keep-history",
        "--keep_history",
        action="store_true",
        help="do not squash the branch's history after the commit (its earlier commits keep the forgotten tasks)",
    )
    hub.add_argument("--cache-dir", "--cache_dir", help="huggingface_hub cache folder")
    hub.add_argument("--token", help="Hub token (default: the saved one)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = _unlearn(args)
    print(report)
    return 1 if getattr(report, "squash_error", None) else 0  # published, but the old history is still there


def _unlearn(args: argparse.Namespace):
    from .artifact import read_config, read_manifest
    from .errors import CommandLineError, MissingBaseModelError, ReplayPreconditionError, UnknownTaskError
    from .hub.sources import could_be_repo_id
    from .task_vector_store import TaskVectorStore
    from .unlearning import unlearn

    folder, hub = args.artifact, {}
    if not Path(args.artifact).expanduser().exists() and could_be_repo_id(args.artifact):
        from huggingface_hub import HfApi

        from .hub.unlearn import download_pinned, pin_revision

        # Pinned once: the data checks, the base model and the commit all refer to this one revision.
        branch = args.revision or "main"
        parent = pin_revision(HfApi(token=args.token), args.artifact, branch)
        hub = {"token": args.token, "cache_dir": args.cache_dir}
        hub = {key: value for key, value in hub.items() if value is not None}
        folder = download_pinned(args.artifact, parent, **hub)
        hub.update(revision=branch, parent_commit=parent, keep_history=args.keep_history)
    elif args.revision or args.keep_history or args.cache_dir or args.token:
        raise CommandLineError("--revision, --keep-history, --cache-dir and --token apply to a Hub repo id only")
    merged = read_manifest(folder)  # fail fast, before loading a model
    unknown = [task for task in args.task if task not in merged]
    if unknown:
        shown = ", ".join(repr(t) for t in sorted(merged)[:5])
        raise UnknownTaskError(f"unknown task {unknown[0]!r}; merged tasks: {shown or 'none'}")
    model = dataset = tokenizer = None
    stored = TaskVectorStore(args.task_vector_store) if args.task_vector_store else None
    if stored is None or any(task not in stored for task in args.task):
        from transformers import AutoModelForCausalLM

        from .hub.sources import hub_lookup
        from .trainer.cli import check_columns, load_data, load_tokenizer, tokenize_rows

        if args.data is None:
            raise ReplayPreconditionError("replaying a task needs its training data (--data)")
        config = read_config(folder)
        base = args.base or config.base_model
        revision = None if args.base else config.base_revision
        if base is None:
            raise MissingBaseModelError("the artifact does not name its base model: pass --base")
        raw = load_data(args.data, "--data", folders=True)
        check_columns(raw, args.task_column, args.text_template)
        downloads = {key: hub[key] for key in ("cache_dir", "token") if key in hub}
        if args.base is None and _holds_tokenizer(args.artifact, hub):
            # The tokenizer the tasks were trained with, saved with the artifact (at the pinned commit of a repo).
            tokenizer = load_tokenizer(args.artifact, "the artifact", revision=hub.get("parent_commit"), **downloads)
        else:
            tokenizer = load_tokenizer(base, "--base", revision=revision, **downloads)
        dataset = tokenize_rows(raw, tokenizer, args.text_template, args.max_length, args.task_column)
        with hub_lookup(base, "--base"):
            model = AutoModelForCausalLM.from_pretrained(base, revision=revision, trust_remote_code=False, **downloads)
    return unlearn(
        args.artifact,
        args.task,
        model=model,
        dataset=dataset,
        task_column=args.task_column,
        processing_class=tokenizer,
        task_vector_store=args.task_vector_store,
        redact=args.redact,
        dry_run=args.dry_run,
        allow_environment_mismatch=args.allow_environment_mismatch,
        **hub,
    )


def _holds_tokenizer(artifact: str, hub: dict) -> bool:
    """Whether the artifact folder, or the repo at the pinned commit `hub["parent_commit"]`, holds a tokenizer."""
    if not hub:
        return (Path(artifact).expanduser() / "tokenizer_config.json").is_file()
    from huggingface_hub import HfApi

    from .hub.sources import hub_lookup

    with hub_lookup(artifact, "the artifact"):
        return HfApi(token=hub.get("token")).file_exists(
            artifact, "tokenizer_config.json", revision=hub["parent_commit"]
        )

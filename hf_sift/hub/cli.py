"""`hf-sift push` and `hf-sift pull`: publish a SIFT artifact to the Hub in one commit, fetch one back."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    push = subparsers.add_parser(
        "push",
        help="push a merged SIFT artifact to the Hub in one commit",
        description=(
            "Push ARTIFACT (a folder written by MergedDelta.save_pretrained) to the Hub repo REPO_ID as one commit "
            "from the branch's current head: only changed files are uploaded, masks of tasks the folder no longer "
            "has are deleted, and README.md is a generated model card. A concurrent commit makes it fail with "
            "nothing changed."
        ),
    )
    push.add_argument("artifact", help="artifact folder")
    push.add_argument("repo_id", help="Hub repo id (created if missing)")
    push.add_argument(
        "--base-model",
        "--base_model",
        help="Hub id of the base model, required when the artifact records a local path (checked)",
    )
    push.add_argument("--revision", default="main", help="branch to push to (default: main)")
    push.add_argument("--commit-message", "--commit_message", help="commit message")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--license", help="license identifier for the model card")
    push.add_argument(
        "--dataset",
        action="append",
        dest="datasets",
        metavar="DATASET_ID",
        help="Hub dataset id for the model card (repeatable; default: those the tasks' metadata records)",
    )
    push.add_argument("--token", help="Hub token (default: the saved one)")
    push.set_defaults(func=run_push)

    pull = subparsers.add_parser(
        "pull",
        help="download a merged SIFT artifact (or one task of it) from the Hub into a new folder",
        description=(
            "Download REPO_ID at one revision into the Hugging Face cache and copy it into the new folder OUTPUT. "
            "With --task, only the config, the sum, that task's mask and the tokenizer are fetched."
        ),
    )
    pull.add_argument("repo_id", help="Hub repo id")
    pull.add_argument("--task", help="fetch only what serving this task needs")
    pull.add_argument("-o", "--output", required=True, help="new output folder (must not exist, or be empty)")
    pull.add_argument("--overwrite", action="store_true", help="replace what a non-empty output folder holds")
    add_hub_options(pull)
    pull.set_defaults(func=run_pull)


def add_hub_options(parser: argparse.ArgumentParser, optional_repo: bool = False) -> None:
    """Add `--revision`, `--cache-dir`, `--local-files-only` and `--token`: where a Hub repo id is read from.

    `optional_repo` says, in the help, that they apply only when the command's input is a repo id, not a folder.
    """
    where = "; for a Hub repo id only" if optional_repo else ""
    parser.add_argument("--revision", help=f"branch, tag or commit (default: main){where}")
    parser.add_argument("--cache-dir", "--cache_dir", help=f"huggingface_hub cache folder{where}")
    parser.add_argument(
        "--local-files-only",
        "--local_files_only",
        action="store_true",
        help=f"use the cache only, download nothing{where}",
    )
    parser.add_argument("--token", help=f"Hub token (default: the saved one){where}")


def hub_options(args: argparse.Namespace) -> dict[str, object]:
    """The `huggingface_hub` keyword arguments of the options [`add_hub_options`] added (those given only)."""
    hub = {"cache_dir": args.cache_dir, "local_files_only": args.local_files_only, "token": args.token}
    return {key: value for key, value in hub.items() if value}


def run_push(args: argparse.Namespace) -> int:
    from .push import push_to_hub

    result = push_to_hub(
        args.artifact,
        args.repo_id,
        base_model=args.base_model,
        revision=args.revision,
        commit_message=args.commit_message,
        private=args.private or None,
        license=args.license,
        datasets=args.datasets,
        token=args.token,
    )
    if result.commit == result.parent:
        print(f"{args.repo_id}@{result.revision} already holds this artifact (commit {result.commit}); nothing pushed")
        return 0
    print(
        f"pushed {args.artifact} to {args.repo_id}@{result.revision}: commit {result.commit} (parent {result.parent}), "
        f"{len(result.uploaded)} file(s) uploaded ({result.bytes_uploaded} bytes), {len(result.deleted)} deleted; "
        f"base {result.base_model}@{result.base_revision}"
    )
    return 0


def run_pull(args: argparse.Namespace) -> int:
    from .pull import pull_artifact

    folder = pull_artifact(
        args.repo_id,
        args.output,
        task=args.task,
        revision=args.revision,
        overwrite=args.overwrite,
        **hub_options(args),
    )
    what = "the whole artifact" if args.task is None else f"task {args.task!r}"
    print(f"pulled {what} of {args.repo_id} into {folder}")
    return 0

"""Pull a SIFT artifact, or the part of it that serves one task, from the Hub into a new local folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..artifact import read_manifest
from ..atomic import staged_folder
from ..errors import UnknownTaskError
from ..output_dir import check_output_dir
from .download import artifact_allow_patterns, resolve_artifact


def pull_artifact(
    repo_id: str,
    output_dir: str | os.PathLike,
    task: str | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    **hub_kwargs: Any,
) -> Path:
    """Download a Hub artifact into the normal cache and copy it into the new folder `output_dir`.

    With `task`, only what serving that task needs is fetched (config, manifest, sum, the task's mask, the
    tokenizer); without it, every file of the repo at `revision`. The folder appears whole or not at all;
    a failed pull leaves `output_dir` as it was.

    Args:
        repo_id (`str`): The Hub repo holding the artifact.
        output_dir (`str` or `os.PathLike`): A folder that does not exist yet (or is empty).
        task (`str`, *optional*): The one task to fetch the mask of.
        revision (`str`, *optional*): Branch, tag or commit; every file comes from the one commit it names.
        overwrite (`bool`, *optional*, defaults to `False`): Replace what a non-empty `output_dir` holds (atomically,
            once everything is downloaded).
        hub_kwargs: `cache_dir`, `token`, `local_files_only`, ... passed to `huggingface_hub`.

    Returns:
        `Path`: The output folder.

    Raises:
        [`~hf_sift.errors.UnknownTaskError`] (the repo has no such task; no mask is downloaded),
        [`~hf_sift.errors.OutputDirError`] (the output exists and is not empty).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    target = check_output_dir(output_dir, overwrite=overwrite)
    patterns = None if task is None else artifact_allow_patterns(task, weights="all")  # format 2 keeps its P
    if task is None:
        source = Path(snapshot_download(repo_id, revision=revision, **hub_kwargs))
    else:
        # Config and manifest first: an unknown task is refused before any mask is fetched.
        artifact = resolve_artifact(repo_id, None, revision, weights="all", **hub_kwargs)
        if task not in read_manifest(artifact.folder):
            raise UnknownTaskError(f"{repo_id} has no task {task!r} at revision {artifact.revision}")
        artifact.ensure_mask(task)
        source = artifact.folder
    with staged_folder(target, lambda folder: check_output_dir(folder, overwrite=overwrite)) as stage:
        # The cache's snapshot folder may also hold files fetched by earlier downloads of the same commit.
        names = [p.relative_to(source).as_posix() for p in sorted(source.rglob("*")) if p.is_file()]
        for name in filter_repo_objects(names, allow_patterns=patterns):
            if not any(part.startswith(".") for part in name.split("/")):
                (stage / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / name, stage / name)  # follows the cache's symlinks to the blobs
    return target

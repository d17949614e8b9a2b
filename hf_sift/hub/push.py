"""Publish a SIFT artifact folder to the Hub as one commit.

A push is a single `HfApi.create_commit` (never `upload_folder`, which may split a large upload into several
commits) whose `parent_commit` is the revision the push started from: if anyone else committed to the branch in
between, the Hub refuses it (HTTP 412) and [`~hf_sift.errors.ConcurrentUpdateError`] is raised with nothing changed.
The commit holds the artifact's files that differ from that revision (unchanged ones are not uploaded again), the
deletion of the artifact files the folder no longer has (the masks of removed tasks, sum shards of another layout),
and a model card. The local folder is only read, under its lock, so that no local save swaps it mid-push.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..artifact import is_artifact_file, mask_filename, read_config, write_artifact
from ..artifact_config import CONFIG_NAME, ArtifactConfig
from ..digest import file_digest
from ..errors import (
    ConcurrentUpdateError,
    CorruptArtifactError,
    HubTransferError,
    MissingBaseModelError,
    PathNotFoundError,
    UnsupportedHubPushError,
)
from ..folder_lock import folder_lock
from ..peft_plain_merge import merges_an_adapter
from ..plain_merge import RECORDED_BASE, plain_merge_writer
from ..shard_size import DEFAULT_MAX_SHARD_SIZE
from ..unlearning_log import LOG_NAME
from .model_card import build_model_card


if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from ..merged_delta import MergedDelta

CARD_NAME = "README.md"


@dataclass
class PushResult:
    """What a push did.

    Args:
        repo_id (`str`): The repo pushed to.
        revision (`str`): The branch pushed to.
        parent (`str`): The commit the push started from.
        commit (`str`): The branch head after the push (equal to `parent` when nothing changed).
        uploaded (`list[str]`): Files added or changed by the commit.
        deleted (`list[str]`): Files the commit deleted.
        bytes_uploaded (`int`): Total size of the files in `uploaded`.
        base_model (`str`): Hub id of the base model recorded in the pushed config.
        base_revision (`str`): The base model's commit recorded in the pushed config.
    """

    repo_id: str
    revision: str
    parent: str
    commit: str
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    base_model: str = ""
    base_revision: str = ""


def is_local_path(name: str) -> bool:
    """Whether a recorded base model name is a local path rather than a Hub repo id."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.path.exists(name)


def push_to_hub(
    artifact_dir: str | os.PathLike,
    repo_id: str,
    *,
    base_model: str | None = None,
    revision: str = "main",
    parent_commit: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    token: str | bool | None = None,
) -> PushResult:
    """Push the SIFT artifact in `artifact_dir` to the Hub repo `repo_id` in one commit.

    The artifact is verified first (the sum against its digest, every mask file against the manifest). The pushed
    `sift_config.json` names the base model by its Hub id and resolved commit, and `README.md` is a generated
    model card; the local folder is left as it is.

    Args:
        artifact_dir (`str` or `os.PathLike`): A folder written by [`MergedDelta.save_pretrained`] (with whatever
            other files it holds, such as a tokenizer).
        repo_id (`str`): The Hub repo; created (with `private`) when it does not exist.
        base_model (`str`, *optional*): Hub id of the base model. Required when the artifact records a local path
            (or nothing); the model is then loaded from the Hub and checked against the artifact's base digests. A
            recorded Hub id is pinned to its recorded commit, or (none recorded) to the branch head once its weights
            pass the same check.
        revision (`str`, *optional*, defaults to `"main"`): The branch to push to.
        parent_commit (`str`, *optional*): The commit the push must start from; defaults to the branch head.
        commit_message (`str`, *optional*): Defaults to a summary of the push.
        commit_description (`str`, *optional*): The commit's description.
        private (`bool`, *optional*): Visibility of a repo this push creates.
        license (`str`, *optional*): License identifier for the model card.
        datasets (`list[str]`, *optional*): Hub dataset ids for the model card (default: from the tasks' metadata).
        token (`str` or `bool`, *optional*): Hub token, as for `huggingface_hub.HfApi`.

    Raises:
        [`~hf_sift.errors.ConcurrentUpdateError`] when the branch moved since `parent_commit` (nothing is pushed),
        [`~hf_sift.errors.MissingBaseModelError`], [`~hf_sift.errors.BaseModelMismatchError`] or
        [`~hf_sift.errors.CorruptArtifactError`], or [`~hf_sift.errors.HubTransferError`] when the connection
        drops or the Hub fails (the branch is then unchanged, or holds the whole commit; pushing again is safe).
    """
    from huggingface_hub import HfApi

    from ..merged_delta import MergedDelta

    folder = Path(artifact_dir).expanduser().absolute()
    if not folder.is_dir():
        raise PathNotFoundError(f"the artifact {str(artifact_dir)!r}: no such folder (push takes a local folder)")
    api = HfApi(token=token)
    with folder_lock(folder.resolve()):  # no local save swaps the folder while its files are read or uploaded
        delta = MergedDelta.from_pretrained(folder, verify=True)
        if merges_an_adapter(delta.names):
            raise UnsupportedHubPushError(
                f"{folder} merges a peft adapter's parameters (e.g. {delta.names[0]!r}): pushing such an artifact is "
                "not supported yet (the Hub base cannot be checked against the adapter's θ0); nothing was pushed"
            )
        for task_id in delta.task_ids:
            path = folder / mask_filename(task_id)
            if file_digest(str(path)) != delta.record(task_id)["mask_digest"]:
                raise CorruptArtifactError(f"{path}: the mask of task {task_id!r} does not match its recorded digest")
        config = read_config(folder)
        base_id, base_sha = _resolve_base(api, config, delta, base_model, token)
        config.base_model, config.base_revision = base_id, base_sha
        records = {t: delta.record(t) for t in delta.task_ids}
        card = build_model_card(
            repo_id,
            base_id,
            base_sha,
            records,
            license,
            datasets,
            delta.log.entries,
            plain_merge=config.format_version >= 2,
        )
        files: dict[str, Path | bytes] = {
            path.relative_to(folder).as_posix(): path
            for path in sorted(folder.rglob("*"))
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        }
        files[CONFIG_NAME] = config.to_json_string().encode()
        files[CARD_NAME] = card.encode()
        message = commit_message or f"hf_sift: push {delta.num_tasks} merged task(s)"
        try:
            result = _commit(api, repo_id, files, revision, parent_commit, message, commit_description, private)
        except Exception as error:
            if not _transfer_failure(error):
                raise
            raise HubTransferError(
                f"the push to {repo_id}@{revision} did not complete ({_first_line(error)}); a commit lands whole or "
                "not at all, and pushing again uploads only what the repo lacks"
            ) from error
    result.base_model, result.base_revision = base_id, base_sha
    return result


def _transfer_failure(error: BaseException) -> bool:
    """Whether `error` (or the error the client wrapped) is a dropped connection or a failure of the Hub (5xx)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    for candidate in (error, error.__cause__):
        if isinstance(candidate, httpx2.TransportError):
            return True
        if isinstance(candidate, HfHubHTTPError) and candidate.response is not None:
            return candidate.response.status_code >= 500
    return False


def _first_line(error: BaseException) -> str:
    cause = error.__cause__ or error
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"


def push_delta(delta: MergedDelta, repo_id: str, *, base: Any = RECORDED_BASE, **kwargs: Any) -> PushResult:
    """Push a [`MergedDelta`] as [`MergedDelta.save_pretrained`] would write it (see [`push_to_hub`]).

    `base` is what P is written from, as for `save_pretrained`: by default the recorded base model, so that the
    published repo is format 2 and loads with vanilla transformers (a base recorded as a Hub id is downloaded for
    that, and checked against the recorded digests); `None` publishes format 1 (no P).
    """
    with tempfile.TemporaryDirectory(prefix="hf-sift-push-") as tmp:
        folder = Path(tmp) / "artifact"
        # Written like save_pretrained, without pointing the delta's masks at this temporary folder.
        log = {LOG_NAME: delta.log.to_bytes()} if len(delta.log) else None
        if base is RECORDED_BASE and delta.base_model is not None and not is_local_path(delta.base_model):
            base = delta.base_model  # a push talks to the Hub anyway: the base may be downloaded (digests checked)
        plain = plain_merge_writer(delta, base, DEFAULT_MAX_SHARD_SIZE)
        write_artifact(folder, delta._config(), delta._records, delta._sum, delta._masks, extra_files=log, plain=plain)
        return push_to_hub(folder, repo_id, **kwargs)


def _resolve_base(
    api: HfApi, config: ArtifactConfig, delta: MergedDelta, base_model: str | None, token: Any
) -> tuple[str, str]:
    """The base model's Hub id and commit; a base given here (or recorded as a local path) is checked by digest."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    recorded = config.base_model
    if base_model is None and (recorded is None or is_local_path(recorded)):
        where = "records no base model" if recorded is None else f"records its base model as the local path {recorded}"
        raise MissingBaseModelError(
            f"the artifact {where}: pass base_model= (hf-sift push --base-model REPO_ID) with the Hub id of that "
            "model, so that a pulled artifact can find its base; its weights are checked against the artifact"
        )
    name = base_model or recorded
    revision = None if base_model is not None else config.base_revision
    try:
        sha = api.model_info(name, revision=revision).sha
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise MissingBaseModelError(f"base model {name!r} (revision {revision}) is not on the Hub: {error}") from None
    if base_model is not None or revision is None:  # a commit not recorded at training: prove it is that base
        _check_hub_base(delta, name, sha, token)
    return name, sha


def _check_hub_base(delta: MergedDelta, name: str, sha: str, token: Any) -> None:
    """Load the Hub base model and check it against the artifact's base digest and base model digest."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from ..remote_code import refuse_remote_code

    kwargs = {"revision": sha, "token": token, "trust_remote_code": False}
    refuse_remote_code(name, sha, token=token)
    config = AutoConfig.from_pretrained(name, **kwargs)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    dtypes = set(delta.dtypes.values())
    model = auto.from_pretrained(name, dtype=dtypes.pop() if len(dtypes) == 1 else "auto", **kwargs)
    state = model.state_dict()
    delta.check_base(state, verify_digest=True)
    if delta.base_model_digest is not None:
        delta.check_base_model(state)


def _changed(local: Path | bytes, remote: Any) -> bool:
    """Whether a local file differs from the repo's entry (compared by size, then sha256 or git blob id)."""
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    if remote is None:
        return True
    data = local if isinstance(local, bytes) else None
    size = len(data) if data is not None else local.stat().st_size  # type: ignore[union-attr]
    if size != remote.size:
        return True
    if data is None and remote.lfs is not None:
        with open(local, "rb") as handle:  # type: ignore[arg-type]
            return sha_fileobj(handle).hex() != remote.lfs.sha256
    data = data if data is not None else local.read_bytes()  # type: ignore[union-attr]
    if remote.lfs is not None:
        import hashlib

        return hashlib.sha256(data).hexdigest() != remote.lfs.sha256
    return git_hash(data) != remote.blob_id


def _commit(
    api: HfApi,
    repo_id: str,
    files: dict[str, Path | bytes],
    revision: str,
    parent_commit: str | None,
    message: str,
    description: str | None,
    private: bool | None,
) -> PushResult:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, RepoFile
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    api.create_repo(repo_id, private=private, exist_ok=True)
    parent = parent_commit or api.model_info(repo_id, revision=revision).sha
    moved = (
        f"{repo_id}@{revision} changed since this push started from {parent}: nothing was pushed. Check what the "
        "other commit changed, then push again (from the new head)"
    )
    try:
        remote = {
            entry.path: entry
            for entry in api.list_repo_tree(repo_id, revision=parent, recursive=True)
            if isinstance(entry, RepoFile)
        }
    except RevisionNotFoundError:  # the parent is gone: the branch's history was squashed or rewritten since
        raise ConcurrentUpdateError(moved) from None
    uploaded = [path for path, source in files.items() if _changed(source, remote.get(path))]
    deleted = sorted(path for path in remote if is_artifact_file(path) and path not in files)
    result = PushResult(repo_id, revision, parent, parent, uploaded, deleted)
    result.bytes_uploaded = sum(
        len(s) if isinstance(s, bytes) else s.stat().st_size for p, s in files.items() if p in uploaded
    )
    if not uploaded and not deleted:
        return result
    operations = [CommitOperationAdd(path, files[path]) for path in uploaded]
    operations += [CommitOperationDelete(path) for path in deleted]
    try:
        info = api.create_commit(
            repo_id,
            operations,  # type: ignore[arg-type]
            commit_message=message,
            commit_description=description,
            revision=revision,
            parent_commit=parent,
        )
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 412:
            raise ConcurrentUpdateError(moved) from None
        raise
    result.commit = info.oid
    return result

"""Unlearn tasks from a SIFT artifact published on the Hub, in one commit from one pinned revision.

The branch head is pinned to one commit; the files of that commit are downloaded into the normal Hugging Face cache
and copied into a temporary staging folder, where [`hf_sift.unlearn`] runs exactly as for a local folder (the same
checks, replay or task-vector store, digest check and atomic save). The new artifact is then published by
[`~hf_sift.hub.push_to_hub`] as **one** commit whose `parent_commit` is the pinned commit: the new sum, plain merge,
config, manifest, log and model card, and the deletion of the forgotten tasks' masks. A concurrent commit makes the
Hub refuse it (HTTP 412), and [`~hf_sift.errors.ConcurrentUpdateError`] is raised with nothing changed.

Earlier revisions still hold the forgotten tasks, so by default the branch's history is then squashed into one
commit (`HfApi.super_squash_history`). Other refs (tags, other branches, pull requests) are never touched: the ones
that still hold a forgotten mask or an older sum or plain merge are listed in the report.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..artifact import MASKS_DIR, is_artifact_file, mask_filename, read_config, read_manifest
from ..artifact_config import ArtifactConfig
from ..errors import ConcurrentUpdateError, HubTransferError, InvalidArgumentError
from ..plain_merge import RECORDED_BASE, is_plain_file
from ..unlearning import UnlearningReport, unlearn
from ..unlearning_log import LOG_NAME
from .download import DELTA_PATTERNS
from .model_card import dataset_ids
from .push import CARD_NAME, _first_line, is_local_path, push_to_hub
from .sources import hub_lookup


if TYPE_CHECKING:
    from huggingface_hub import HfApi


@dataclass
class HubUnlearningReport(UnlearningReport):
    """What unlearning from a Hub repo did: the [`UnlearningReport`] of the replay, and what was published.

    Args:
        repo_id (`str`): The repo.
        revision (`str`): The branch committed to.
        parent (`str`): The pinned commit the files were read from (the new commit's parent).
        commit (`str`, *optional*): The unlearning commit (None in a dry run; after a squash only `head` exists).
        head (`str`, *optional*): The branch head afterwards: the squashed commit, or `commit` with the history kept.
        uploaded (`list[str]`): Files the commit added or changed.
        deleted (`list[str]`): Files the commit deleted (the forgotten tasks' masks, a stale plain merge).
        bytes_uploaded (`int`): Total size of the files in `uploaded`.
        squashed (`bool`): Whether the branch's history was squashed after the commit.
        squash_error (`str`, *optional*): Why the squash failed, when it did (the commit has landed).
        refs_holding (`list[str]`): Other refs (`refs/tags/...`, `refs/heads/...`, `refs/pr/...`) whose files still
            hold a forgotten task: its mask, or the sum or plain merge of the pinned revision.
    """

    repo_id: str = ""
    revision: str = "main"
    parent: str = ""
    commit: str | None = None
    head: str | None = None
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    squashed: bool = False
    squash_error: str | None = None
    refs_holding: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [super().__str__()]
        if self.dry_run:
            return "\n".join(lines)
        lines.append(
            f"published to {self.repo_id}@{self.revision}: commit {self.commit} (parent {self.parent}), "
            f"{len(self.uploaded)} file(s) uploaded ({self.bytes_uploaded} bytes), {len(self.deleted)} deleted"
        )
        if self.squashed:
            lines.append(
                f"history of {self.revision} squashed into {self.head}: no earlier commit of the branch is left"
            )
        elif self.squash_error is not None:
            lines.append(
                f"warning: the history of {self.revision} was NOT squashed ({self.squash_error}); its earlier commits "
                f"still hold the forgotten task(s): squash it with HfApi().super_squash_history({self.repo_id!r}, "
                f"branch={self.revision!r})"
            )
        else:
            lines.append(f"history of {self.revision} kept: its earlier commits still hold the forgotten task(s)")
        for ref in self.refs_holding:
            lines.append(f"warning: {ref} still holds a forgotten task; it is not forgotten while that ref exists")
        return "\n".join(lines)


def pin_revision(api: HfApi, repo_id: str, branch: str) -> str:
    """The commit the branch `branch` of `repo_id` points at now.

    Raises:
        [`~hf_sift.errors.PathNotFoundError`] (no such repo) or [`~hf_sift.errors.InvalidArgumentError`] (no such
        branch: unlearning commits to a branch, so a tag or a commit id is refused).
    """
    with hub_lookup(repo_id, "the artifact"):
        refs = api.list_repo_refs(repo_id)
    heads = {ref.name: ref.target_commit for ref in refs.branches}
    if branch not in heads:
        raise InvalidArgumentError(
            f"{branch!r} is not a branch of {repo_id} (branches: {', '.join(sorted(heads))}); unlearning commits to "
            "a branch, so give a branch name as the revision"
        )
    return heads[branch]


def download_pinned(repo_id: str, commit: str, **hub_kwargs: Any) -> Path:
    """Download what unlearning reads at `commit` into the Hugging Face cache: config, manifest, sum, every mask, the
    unlearning log and the model card (the plain merge is rewritten, so it is not fetched). Returns the snapshot."""
    from huggingface_hub import snapshot_download

    patterns = [*DELTA_PATTERNS, f"{MASKS_DIR}/*.safetensors", LOG_NAME, CARD_NAME]
    with hub_lookup(repo_id, "the artifact"):
        return Path(snapshot_download(repo_id, revision=commit, allow_patterns=patterns, **hub_kwargs))


def unlearn_repo(
    repo_id: str,
    task_ids: str | Sequence[str],
    *,
    revision: str | None = None,
    parent_commit: str | None = None,
    keep_history: bool = False,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    commit_message: str | None = None,
    **unlearn_kwargs: Any,
) -> HubUnlearningReport:
    """Unlearn `task_ids` from the artifact of the Hub repo `repo_id` (see the module's description).

    Args:
        repo_id (`str`): The Hub repo holding the artifact.
        task_ids (`str` or `list[str]`): The tasks to remove.
        revision (`str`, *optional*, defaults to `"main"`): The branch to read and commit to.
        parent_commit (`str`, *optional*): The commit to start from (default: the branch head now); the commit is
            refused with [`~hf_sift.errors.ConcurrentUpdateError`] unless it is still the head then.
        keep_history (`bool`, *optional*, defaults to `False`): Do not squash the branch's history afterwards.
        token (`str` or `bool`, *optional*): Hub token, as for `huggingface_hub.HfApi`.
        cache_dir (`str`, *optional*): The Hugging Face cache folder to download into.
        commit_message (`str`, *optional*): Defaults to `"hf_sift: unlearn N task(s)"` (no task id in it).
        unlearn_kwargs: The arguments of [`hf_sift.unlearn`] (`model`, `dataset`, `task_vector_store`, `redact`,
            `dry_run`, ...).

    Returns:
        [`HubUnlearningReport`]

    Raises:
        The errors of [`hf_sift.unlearn`] (the repo is unchanged), [`~hf_sift.errors.ConcurrentUpdateError`] (the
        branch moved since the pinned commit; nothing changed, run it again) or
        [`~hf_sift.errors.HubTransferError`] (the connection dropped; the branch is unchanged or holds the whole
        commit).
    """
    from huggingface_hub import HfApi, ModelCard

    started = time.perf_counter()
    api = HfApi(token=token)
    branch = revision or "main"
    head = pin_revision(api, repo_id, branch)  # also checks that the repo and the branch exist
    pinned = parent_commit or head
    hub_kwargs = {k: v for k, v in {"token": token, "cache_dir": cache_dir}.items() if v is not None}
    snapshot = download_pinned(repo_id, pinned, **hub_kwargs)
    before = _tree(api, repo_id, pinned)
    if unlearn_kwargs.get("base", RECORDED_BASE) is RECORDED_BASE and not unlearn_kwargs.get("dry_run"):
        # The repo keeps its format: P is written again (from the recorded base, fetched) when it had one.
        has_plain = any(is_plain_file(path) for path in before)
        unlearn_kwargs["base"] = _base_folder(read_config(snapshot), **hub_kwargs) if has_plain else None
    with tempfile.TemporaryDirectory(prefix="hf-sift-unlearn-") as tmp:
        stage = Path(tmp) / "artifact"
        for path in sorted(snapshot.rglob("*")):
            name = path.relative_to(snapshot).as_posix()
            if path.is_file() and is_artifact_file(name) and not is_plain_file(name):  # P is written anew
                (stage / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, stage / name)  # follows the cache's links; the cache is never written
        done = unlearn(stage, task_ids, **unlearn_kwargs)
        for path in [p for p in stage.rglob("*") if p.is_file()]:
            if not is_artifact_file(path.relative_to(stage).as_posix()):
                # The save put the base's tokenizer beside P; the repo's own files (tokenizer, ...) stay as they are.
                path.unlink()
        report = HubUnlearningReport(**{f.name: getattr(done, f.name) for f in fields(UnlearningReport)})
        report.artifact, report.repo_id = f"{repo_id}@{pinned}", repo_id
        report.revision, report.parent = branch, pinned
        if report.dry_run:
            report.wall_time_s = time.perf_counter() - started
            return report
        license, datasets = None, None
        if (snapshot / CARD_NAME).is_file():  # keep the card's license and datasets, less the forgotten tasks' own
            data = ModelCard.load(snapshot / CARD_NAME).data
            removed = set(dataset_ids(read_manifest(snapshot))) - set(dataset_ids(read_manifest(stage)))
            license = data.license
            datasets = None if data.datasets is None else [d for d in data.datasets if d not in removed]
        count = len(report.tasks)
        message = commit_message or f"hf_sift: unlearn {count} task{'s' if count != 1 else ''}"
        try:
            pushed = push_to_hub(
                stage, repo_id, revision=branch, parent_commit=pinned, commit_message=message, license=license,
                datasets=datasets, token=token,
            )  # fmt: skip
        except ConcurrentUpdateError:
            raise ConcurrentUpdateError(
                f"{repo_id}@{branch} moved since the unlearning started from {pinned}: nothing was changed on the "
                "Hub. Run the unlearning again: it starts from the new head"
            ) from None
        except HubTransferError as error:
            raise HubTransferError(
                f"the unlearning commit to {repo_id}@{branch} did not complete ({_first_line(error)}); a commit lands "
                f"whole or not at all: while {pinned} is still the head, nothing changed and running the unlearning "
                "again is safe"
            ) from error
    report.commit = report.head = pushed.commit
    report.uploaded, report.deleted, report.bytes_uploaded = pushed.uploaded, pushed.deleted, pushed.bytes_uploaded
    if not keep_history:
        try:
            api.super_squash_history(
                repo_id,
                branch=branch,
                commit_message=f"hf_sift: squash the history of {branch} after unlearning {count} task(s)",
            )
            report.squashed = True
            report.head = api.model_info(repo_id, revision=branch).sha
        except Exception as error:  # the commit has landed: report the failure rather than lose the report
            report.squash_error = _first_line(error)
    after = _tree(api, repo_id, report.head)
    masks = {mask_filename(t.task_id) for t in report.tasks}
    # The weights that held the forgotten tasks: the pinned revision's sum and plain merge, where they changed.
    old = {
        path: oid
        for path, oid in before.items()
        if (path.startswith("sift_delta") or is_plain_file(path)) and after.get(path) != oid
    }
    report.refs_holding = refs_holding(api, repo_id, branch, masks, old)
    report.wall_time_s = time.perf_counter() - started  # the whole call: downloads, replay, commit, squash, checks
    return report


def _base_folder(config: ArtifactConfig, **hub_kwargs: Any) -> str | None:
    """The recorded base model's weights and configs at its recorded commit, in the cache (to write P from)."""
    from huggingface_hub import snapshot_download

    if config.base_model is None or is_local_path(config.base_model):
        return None
    patterns = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json"]
    with hub_lookup(config.base_model, "the recorded base model"):
        return snapshot_download(
            config.base_model, revision=config.base_revision, allow_patterns=patterns, **hub_kwargs
        )


def _tree(api: HfApi, repo_id: str, revision: str) -> dict[str, str]:
    """`path -> git blob id` of every file of `repo_id` at `revision`."""
    from huggingface_hub import RepoFile

    entries = api.list_repo_tree(repo_id, revision=revision, recursive=True)
    return {entry.path: entry.blob_id for entry in entries if isinstance(entry, RepoFile)}


def refs_holding(api: HfApi, repo_id: str, branch: str, masks: set[str], old: dict[str, str]) -> list[str]:
    """The refs other than `branch` whose files hold one of `masks` or one of the `old` files (`path -> blob id`).

    Tags, other branches, pull requests and conversions are all checked; each ref is named by its full git ref.
    """
    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    holding = []
    for ref in [*refs.branches, *refs.tags, *(refs.pull_requests or []), *refs.converts]:
        if ref.ref == f"refs/heads/{branch}":
            continue
        tree = _tree(api, repo_id, ref.target_commit)
        if masks & set(tree) or any(tree.get(path) == oid for path, oid in old.items()):
            holding.append(ref.ref)
    return sorted(holding)

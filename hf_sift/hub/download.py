"""Turn a local folder or a Hub repo id into local files, downloading only what serving one task needs.

A merged artifact holds one mask per task, so a repo with many tasks is mostly masks. Serving one task needs the
config, the manifest, the sum and that task's mask (plus the tokenizer files that live next to them), and nothing
else is downloaded. Further masks are fetched one at a time when a served model switches task.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError

from ..artifact import CONFIG_NAME, DELTA_INDEX_NAME, MANIFEST_NAME, MASKS_DIR, mask_filename
from ..errors import InvalidArgumentTypeError, PathNotFoundError
from ..unlearning_log import LOG_NAME
from .sources import could_be_repo_id, hub_lookup


# Files a tokenizer (and text-generation defaults) may be saved as; they travel with the artifact when present.
TOKENIZER_PATTERNS: tuple[str, ...] = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "*.tiktoken",
    "chat_template.*",
    "generation_config.json",
)

# The files of the merged delta itself, without masks.
DELTA_PATTERNS: tuple[str, ...] = (CONFIG_NAME, MANIFEST_NAME, "sift_delta*.safetensors", DELTA_INDEX_NAME)

# The keyword arguments of `snapshot_download` / `hf_hub_download` a caller may pass through.
HUB_KWARGS: frozenset[str] = frozenset(
    {"cache_dir", "token", "local_files_only", "force_download", "endpoint", "etag_timeout", "headers", "repo_type"}
)


# The weights a served model reads: the sum Q, or (format 2) the plain merge P.
WEIGHT_PATTERNS: dict[str, tuple[str, ...]] = {
    "sum": ("sift_delta*.safetensors", DELTA_INDEX_NAME),
    "plain": ("model*.safetensors", "model.safetensors.index.json"),
    # A one-task copy that stays a whole artifact: both, and P's transformers config.
    "all": (
        "sift_delta*.safetensors",
        DELTA_INDEX_NAME,
        "model*.safetensors",
        "model.safetensors.index.json",
        "config.json",
        "adapter_model.safetensors",  # a peft plain merge (peft_plain_merge.py)
        "adapter_config.json",
    ),
}


def artifact_allow_patterns(
    task: str | None = None, include_tokenizer: bool = True, weights: str | None = "sum"
) -> list[str]:
    """The `allow_patterns` that fetch the files needed to serve `task` (no mask at all when `task` is None).

    `weights` picks the weights read: `"sum"` (Q), `"plain"` (P, format 2), `"all"` (both, with P's `config.json`:
    a copy that stays a whole artifact) or `None` (neither, fetched later with [`ResolvedArtifact.ensure_weights`]).
    """
    patterns = [CONFIG_NAME, MANIFEST_NAME, *(WEIGHT_PATTERNS[weights] if weights else ())]
    if task is not None:
        patterns.append(mask_filename(task))
    if include_tokenizer:
        patterns.extend(TOKENIZER_PATTERNS)
    return patterns


def _check_hub_kwargs(hub_kwargs: dict[str, Any]) -> None:
    unknown = sorted(set(hub_kwargs) - HUB_KWARGS)
    if unknown:
        raise InvalidArgumentTypeError(
            f"unexpected keyword argument(s) {unknown}; Hub options are {sorted(HUB_KWARGS)}"
        )


@dataclass
class ResolvedArtifact:
    """Where an artifact's files are on this machine, and how to fetch more of them.

    Args:
        folder (`Path`): Local folder holding the artifact (a snapshot folder of the Hub cache for a repo id).
        repo_id (`str`, *optional*): The Hub repo id, or `None` for a local folder.
        revision (`str`, *optional*): The commit the files were downloaded from (so later masks match them).
        hub_kwargs (`dict`): Options passed to `huggingface_hub` for later downloads.
    """

    folder: Path
    repo_id: str | None = None
    revision: str | None = None
    hub_kwargs: dict[str, Any] = field(default_factory=dict)
    fetched: set[str] = field(default_factory=set)

    def ensure_weights(self, weights: str) -> None:
        """Download the sum (`"sum"`) or the plain merge (`"plain"`) from the same commit, if not local yet."""
        if self.repo_id is None or weights in self.fetched:
            return
        snapshot_download(
            self.repo_id, revision=self.revision, allow_patterns=list(WEIGHT_PATTERNS[weights]), **self.hub_kwargs
        )
        self.fetched.add(weights)

    def ensure_mask(self, task_id: str) -> Path:
        """Local path of `task_id`'s mask file, downloading it from the same commit when it is not there yet.

        A mask that the repo lacks is left missing; reading it then raises
        [`~hf_sift.errors.CorruptArtifactError`].
        """
        relative = mask_filename(task_id)
        path = self.folder / relative
        if self.repo_id is None or path.exists():
            return path
        try:
            return Path(hf_hub_download(self.repo_id, relative, revision=self.revision, **self.hub_kwargs))
        except EntryNotFoundError:  # the repo lacks it: reading it reports the missing file
            return path


def resolve_artifact(
    path_or_repo_id: str | os.PathLike,
    task: str | None = None,
    revision: str | None = None,
    include_tokenizer: bool = True,
    weights: str | None = "sum",
    **hub_kwargs: Any,
) -> ResolvedArtifact:
    """Resolve a local artifact folder or a Hub repo id to local files.

    Args:
        path_or_repo_id (`str` or `os.PathLike`): A local folder, or the id of a Hub repo holding an artifact.
        task (`str`, *optional*): The task whose mask to fetch; `None` fetches no mask.
        revision (`str`, *optional*): Branch, tag or commit of the Hub repo (ignored for a local folder).
        include_tokenizer (`bool`, *optional*, defaults to `True`): Also fetch the tokenizer files, if any.
        weights (`str`, *optional*, defaults to `"sum"`): Which weights to fetch: `"sum"`, `"plain"` or `None`.
        hub_kwargs: `cache_dir`, `token`, `local_files_only`, `force_download`, `endpoint`, `etag_timeout`,
            `headers` or `repo_type`, passed to `huggingface_hub.snapshot_download`.

    Raises:
        [`~hf_sift.errors.PathNotFoundError`]: No such folder, and (for a name that could be a repo id) the Hub, or
            the local cache when offline, lacks it too.
    """
    _check_hub_kwargs(hub_kwargs)
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        return ResolvedArtifact(folder=local.absolute())
    if local.exists():
        raise PathNotFoundError(f"the artifact {str(path_or_repo_id)!r} is a file; an artifact is a folder")
    with hub_lookup(path_or_repo_id, "the artifact"):
        folder = Path(
            snapshot_download(
                str(path_or_repo_id),
                revision=revision,
                allow_patterns=artifact_allow_patterns(task, include_tokenizer, weights),
                **hub_kwargs,
            )
        )
    # A snapshot folder is named after the commit it holds: later masks come from that same commit.
    return ResolvedArtifact(
        folder=folder,
        repo_id=str(path_or_repo_id),
        revision=folder.name,
        hub_kwargs=hub_kwargs,
        fetched={weights} if weights else set(),
    )


def resolve_delta_folder(path_or_repo_id: str | os.PathLike, revision: str | None = None, **hub_kwargs: Any) -> Path:
    """A local folder as it is, or the cache folder of a Hub repo's whole merged delta: config, manifest, sum, every
    mask and the unlearning log (what [`~hf_sift.MergedDelta`] holds), at one commit. A missing local path stays a
    local path."""
    _check_hub_kwargs(hub_kwargs)
    local = Path(path_or_repo_id).expanduser()
    if local.exists() or not could_be_repo_id(path_or_repo_id):
        return local
    patterns = [*DELTA_PATTERNS, f"{MASKS_DIR}/*.safetensors", LOG_NAME]
    with hub_lookup(path_or_repo_id, "the artifact"):
        return Path(snapshot_download(str(path_or_repo_id), revision=revision, allow_patterns=patterns, **hub_kwargs))

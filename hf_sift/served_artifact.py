"""What a served model reads from an artifact: its config, manifest and masks, and the sum only when it needs it.

[`ServedArtifact`] is the first of the three steps of [`~hf_sift.MergedMaskedModel.from_pretrained`] (resolve
files, load the base, serve): it resolves a folder or Hub repo, reads and checks `sift_config.json` and
`sift_manifest.json`, and hands out one task's mask at a time. A format-2 artifact served in its stored dtype and
scale never reads the sum Q; any other load reads it through [`MergedDelta`].
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .artifact import load_mask_file, mapped_mask_file, mask_filename, read_artifact
from .artifact_config import ArtifactConfig
from .digest import digest_tensors
from .errors import CorruptArtifactError, UnknownTaskError
from .hub.download import ResolvedArtifact, resolve_artifact
from .merged_delta import MergedDelta
from .plain_merge import PlainMergeReader
from .task_id import validate_task_id


class ServedArtifact:
    """An artifact's checked config and manifest, its masks on demand, and its sum Q loaded only when asked for.

    Has the attributes serving reads from a [`MergedDelta`] (`names`, `shapes`, `dtypes`, `scale_bits`, `sum`,
    `base_digest`, `base_model_digest`, `task_ids`), so that the serving functions take either.

    Args:
        files (`ResolvedArtifact`): Where the artifact's files are (and how to fetch more masks).
        config (`ArtifactConfig`): The checked `sift_config.json`.
        records (`dict`): The checked manifest records.
    """

    def __init__(self, files: ResolvedArtifact, config: ArtifactConfig, records: dict[str, dict[str, Any]]):
        self.files = files
        self.config = config
        self._records = records
        self._delta: MergedDelta | None = None
        self._sum_check: Future[str] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._sum_verified = False

    @classmethod
    def resolve(
        cls, path_or_repo_id: str | os.PathLike, task: str | None, revision: str | None = None, **hub_kwargs: Any
    ) -> ServedArtifact:
        """Resolve the files (downloading the config, manifest, tokenizer and `task`'s mask), read the config and
        manifest, and make sure `task` exists. The weights (P or the sum) come with [`read_plain`] or [`delta`]."""
        files = resolve_artifact(path_or_repo_id, task, revision, weights=None, **hub_kwargs)
        config, records = read_artifact(files.folder)
        self = cls(files, config, records)
        self.fetch_mask(task)
        return self

    # ------------------------------------------------------------------ what serving reads

    @property
    def folder(self) -> Path:
        return self.files.folder

    @property
    def names(self) -> list[str]:
        return sorted(self.config.shapes)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.config.shapes

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return self.config.dtypes

    @property
    def scale_bits(self) -> int:
        return self.config.scale_bits

    @property
    def base_digest(self) -> str:
        return self.config.base_digest

    @property
    def base_model_digest(self) -> str | None:
        return self.config.base_model_digest

    @property
    def task_ids(self) -> list[str]:
        return sorted(self._records)

    @property
    def has_plain_merge(self) -> bool:
        """Whether the artifact stores P (format 2)."""
        return self.config.plain_digests is not None

    def default_scale(self) -> float:
        """1/T (0 when nothing is merged): the scale P is stored at."""
        return 1.0 / len(self._records) if self._records else 0.0

    def record(self, task_id: str) -> dict[str, Any]:
        task_id = validate_task_id(task_id)
        if task_id not in self._records:
            shown = ", ".join(repr(t) for t in self.task_ids[:5])
            more = f", ... ({len(self._records)} in all)" if len(self._records) > 5 else ""
            raise UnknownTaskError(f"unknown task {task_id!r}; merged tasks: {shown or 'none'}{more}")
        return self._records[task_id]

    def fetch_mask(self, task: str | None) -> None:
        """Check that `task` exists (before anything is downloaded), then make sure its mask file is local."""
        if task is not None:
            self.record(task)
            self.files.ensure_mask(task)

    def load_mask(self, task: str | None) -> dict[str, torch.Tensor] | None:
        """The packed masks of `task` (`None` for the plain merge), read and checked against their digest."""
        if task is None:
            return None
        path = self.folder / mask_filename(task)
        return load_mask_file(path, self.record(task)["mask_digest"], self.shapes)

    @contextlib.contextmanager
    def open_mask(self, task: str | None) -> Iterator[dict[str, torch.Tensor] | None]:
        """Like [`load_mask`], mapped while its digest is checked alongside (raises on leaving the block)."""
        if task is None:
            yield None
            return
        with mapped_mask_file(self.folder / mask_filename(task), self.record(task)["mask_digest"], self.shapes) as m:
            yield m

    def read_plain(self, reader: PlainMergeReader) -> dict[str, torch.Tensor]:
        """The tuned tensors of P (format 2), downloaded first for a Hub repo; `reader` checks their digests."""
        self.files.ensure_weights("plain")
        return reader.read(self.names)

    def plain_reader(self, verify: bool) -> PlainMergeReader:
        return PlainMergeReader(self.folder, self.config.plain_digests or {}, self.shapes, self.dtypes, verify)

    # ------------------------------------------------------------------ the sum, when needed

    @property
    def delta(self) -> MergedDelta:
        """The [`MergedDelta`] (the sum Q), read on first use; its digest is checked by [`check_sum`]."""
        if self._delta is None:
            self.files.ensure_weights("sum")
            self._delta = MergedDelta.from_pretrained(self.folder, verify=False)
            if self._delta.recorded_digest != self.config.delta_digest:  # a save landed since the config was read
                raise CorruptArtifactError(f"{self.folder} changed while it was read; load it again")
        return self._delta

    @property
    def sum(self) -> dict[str, torch.Tensor]:
        return self.delta.sum

    def start_sum_check(self, verify: bool) -> None:
        """Read the sum and, with `verify`, start checking its digest in a background thread."""
        delta = self.delta
        if verify and self._sum_check is None and not self._sum_verified:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_sift-digest")
            self._sum_check = self._pool.submit(digest_tensors, delta.sum)

    def check_sum(self) -> None:
        """Raise [`~hf_sift.errors.CorruptArtifactError`] if the sum read does not match its recorded digest."""
        if self._sum_check is None:
            return
        try:
            if self._sum_check.result() != self.config.delta_digest:
                raise CorruptArtifactError(f"the sum in {self.folder} does not match its recorded digest")
            self._sum_verified = True
        finally:
            self._pool.shutdown()
            self._sum_check, self._pool = None, None

    def close(self) -> None:
        """Drop the sum (read again if asked for) and stop a digest check under way."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._delta, self._sum_check, self._pool = None, None, None

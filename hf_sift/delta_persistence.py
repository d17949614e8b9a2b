"""Writing a [`~hf_sift.MergedDelta`] as an artifact folder and reading it back (see docs/FORMAT.md).

[`MergedDelta.save_pretrained`] and [`MergedDelta.from_pretrained`] are thin wrappers of [`save_delta`] and
[`load_delta`]: the exact sum stays in `merged_delta.py`, and what touches files is here (the layout itself is
`artifact.py`, the plain merge P `plain_merge.py`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifact import iter_delta, mask_filename, read_artifact, write_artifact
from .artifact_config import ArtifactConfig
from .artifact_state import ArtifactStates, read_consistently
from .errors import CorruptArtifactError
from .plain_merge import plain_merge_writer
from .unlearning_log import LOG_NAME, UnlearningLog


if TYPE_CHECKING:
    from .merged_delta import MergedDelta


def artifact_config(delta: MergedDelta) -> ArtifactConfig:
    """The `sift_config.json` of `delta` as it stands (format and per-tensor digests are set by the save)."""
    return ArtifactConfig(
        base_digest=delta.base_digest,
        sign_seed=delta.sign_seed,
        scale_bits=delta.scale_bits,
        shapes=dict(delta.shapes),
        dtypes=dict(delta.dtypes),
        selection=delta.selection,
        num_tasks=delta.num_tasks,
        delta_digest=delta.digest,
        base_model=delta.base_model,
        base_revision=delta.base_revision,
        base_model_digest=delta.base_model_digest,
    )


def save_delta(
    delta: MergedDelta, save_directory: str | os.PathLike, max_shard_size: int | str, *, overwrite: bool, base: Any
) -> None:
    """Write `delta` into `save_directory` atomically, as a compare-and-swap (see [`MergedDelta.save_pretrained`]).

    After the save, `delta`'s masks point at the files written and its recorded digest is the one saved.
    """
    save_directory = Path(save_directory).absolute()
    config = artifact_config(delta)
    check = delta._artifact_states.precondition(save_directory, overwrite)
    log = {LOG_NAME: delta.log.to_bytes()} if len(delta.log) else None
    plain = plain_merge_writer(delta, base, max_shard_size)
    mask_digests, written = write_artifact(
        save_directory,
        config,
        delta._records,
        delta._sum,
        delta._masks,
        max_shard_size,
        log,
        precondition=check,
        plain=plain,
    )
    delta._artifact_states.remember(save_directory, written)
    for task_id, record in delta._records.items():
        delta._masks[task_id] = save_directory / mask_filename(task_id)
        record["mask_digest"] = mask_digests[task_id]
    delta.recorded_digest = config.delta_digest


def load_delta(
    cls: type[MergedDelta],
    directory: str | os.PathLike,
    verify: bool,
    revision: str | None,
    hub_kwargs: dict[str, Any],
) -> MergedDelta:
    """Read the artifact at `directory` (a folder, or a Hub repo id downloaded first) into a new `cls` that
    remembers the state read (see [`MergedDelta.from_pretrained`])."""
    if hub_kwargs or revision is not None or not Path(directory).is_dir():
        from .hub.download import resolve_delta_folder

        directory = resolve_delta_folder(directory, revision, **hub_kwargs)
    directory = Path(directory).absolute()
    delta, state = read_consistently(directory, lambda: read_delta(cls, directory, verify))
    delta._artifact_states = ArtifactStates()
    delta._artifact_states.remember(directory, state)
    return delta


def read_delta(cls: type[MergedDelta], directory: Path, verify: bool) -> MergedDelta:
    """One read of the artifact in `directory`: config, manifest, the sum tensor by tensor, the log; masks stay
    on disk. With `verify`, the sum must match its recorded digest."""
    config, records = read_artifact(directory)
    delta = cls.__new__(cls)
    delta.shapes, delta.dtypes, delta.selection = config.shapes, config.dtypes, config.selection
    delta.sign_seed, delta.scale_bits = config.sign_seed, config.scale_bits
    delta.base_model, delta.base_revision = config.base_model, config.base_revision
    delta.base_digest, delta.base_model_digest = config.base_digest, config.base_model_digest
    delta.recorded_digest = config.delta_digest
    delta._sum = dict(iter_delta(directory, delta.shapes))
    delta._bounds = {}  # filled by `_bound` when tasks are added or removed; serving never needs them
    delta._records = records
    delta._masks = {t: directory / mask_filename(t) for t in records}
    delta.log = UnlearningLog.load(directory)
    if verify and delta.digest != config.delta_digest:
        raise CorruptArtifactError(f"the sum in {directory} does not match its recorded digest")
    return delta

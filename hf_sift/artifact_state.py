"""Compare-and-swap saves of an artifact folder: the state a writer started from, checked again right before its swap.

The state of a folder is a digest of the bytes of its `sift_config.json` and `sift_manifest.json` (which record the
digest of the sum and of every mask, so they pin the whole artifact), or "no artifact" when it has neither. A
[`~hf_sift.MergedDelta`] remembers the state of each folder it was loaded from or saved to ([`ArtifactStates`]);
a save then succeeds only if the folder still holds that state, re-checked under the folder's lock
([`~hf_sift.folder_lock.folder_lock`]) held across the swap. Otherwise it raises
[`~hf_sift.errors.ConcurrentUpdateError`] naming what the other writer changed, and the folder stays as that writer
made it. Readers take no lock: [`read_consistently`] re-reads the state after loading and starts over if a save
landed in between.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import ConcurrentUpdateError, CorruptArtifactError


# The files whose bytes make up the state, as named in .artifact (not imported: artifact.py imports this module).
# The manifest comes last: task ids are read from it.
STATE_FILES = ("sift_config.json", "sift_manifest.json")
_READ_ATTEMPTS = 8
_RETRY_HINT = "reload it (MergedDelta.from_pretrained), reapply your change and save again"

T = TypeVar("T")


@dataclass(frozen=True)
class ArtifactState:
    """What an artifact folder held when it was read.

    Args:
        digest (`str` or `None`): sha256 over the bytes of `sift_config.json` and `sift_manifest.json`; None when the
            folder is missing or holds neither file.
        task_ids (`tuple[str, ...]`, *optional*): The task ids of its manifest, for messages (empty if unreadable).
    """

    digest: str | None
    task_ids: tuple[str, ...] = ()

    @property
    def is_artifact(self) -> bool:
        """Whether the folder held an artifact (or part of one)."""
        return self.digest is not None

    @classmethod
    def read(cls, folder: str | os.PathLike) -> ArtifactState:
        """The current state of `folder` (reads two small files, takes no lock)."""
        parts = [_read_bytes(Path(folder) / name) for name in STATE_FILES]
        if all(part is None for part in parts):
            return cls(None)
        digest = hashlib.sha256()
        for part in parts:  # length-prefixed, so that moving bytes from one file to the next changes the digest
            digest.update(b"-" if part is None else len(part).to_bytes(8, "little") + part)
        return cls("sha256:" + digest.hexdigest(), _task_ids(parts[-1]))


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _task_ids(manifest: bytes | None) -> tuple[str, ...]:
    try:
        tasks = json.loads(manifest or b"").get("tasks")
    except (ValueError, AttributeError):
        return ()
    return tuple(sorted(tasks)) if isinstance(tasks, dict) else ()


def describe_change(before: ArtifactState, now: ArtifactState) -> str:
    """How the folder went from `before` to `now`, in words (e.g. "added task(s) ['b']")."""
    if not now.is_artifact:
        return "deleted it"
    added = sorted(set(now.task_ids) - set(before.task_ids))
    removed = sorted(set(before.task_ids) - set(now.task_ids))
    changes = [f"added task(s) {added}"] * bool(added) + [f"removed task(s) {removed}"] * bool(removed)
    if not changes:
        return f"rewrote it (same task(s) {list(now.task_ids)}, other contents)"
    return " and ".join(changes) + f"; it now holds task(s) {list(now.task_ids)}"


class ArtifactStates:
    """The state of every folder a [`~hf_sift.MergedDelta`] was loaded from or saved to, and the rule its saves obey.

    Saving into a folder this object has seen requires the folder to still hold the state last seen there. Saving
    into any other folder requires it to hold no artifact, or exactly a state seen elsewhere (a byte-identical copy).
    `overwrite=True` drops the check: whatever the folder holds is replaced.
    """

    def __init__(self) -> None:
        self._by_folder: dict[Path, ArtifactState] = {}

    def remember(self, folder: str | os.PathLike, state: ArtifactState) -> None:
        """Record that `folder` held `state` when it was loaded or saved."""
        self._by_folder[Path(folder).resolve()] = state

    def precondition(self, folder: str | os.PathLike, overwrite: bool = False) -> Callable[[Path], None] | None:
        """The check a save into `folder` must pass under the folder's lock (None: no check)."""
        if overwrite:
            return None
        folder = Path(folder).resolve()
        expected = self._by_folder.get(folder)
        if expected is not None:
            return lambda target: _check_unchanged(target, expected)
        known = {s.digest for s in self._by_folder.values()}
        return lambda target: _check_no_other_artifact(target, known)


def _check_unchanged(folder: Path, expected: ArtifactState) -> None:
    now = ArtifactState.read(folder)
    if now.digest != expected.digest:
        raise ConcurrentUpdateError(
            f"{folder} changed since this MergedDelta read it: another writer {describe_change(expected, now)}. "
            f"Nothing was written; {_RETRY_HINT}."
        )


def _check_no_other_artifact(folder: Path, known: set[str | None]) -> None:
    now = ArtifactState.read(folder)
    if now.is_artifact and now.digest not in known:
        raise ConcurrentUpdateError(
            f"{folder} holds an artifact (task(s) {list(now.task_ids)}) that this MergedDelta was not loaded from; "
            "nothing was written. Load it with MergedDelta.from_pretrained to change it, or pass overwrite=True to "
            "replace it."
        )


def read_consistently(folder: str | os.PathLike, load: Callable[[], T]) -> tuple[T, ArtifactState]:
    """Run `load()` (which reads `folder`) until no save lands during it, and return its result and the state read.

    A save swaps the folder in one step, but a reader opens its files one by one; if the state read after
    `load()` differs from the one before, the result may mix two saves and is thrown away. A
    [`~hf_sift.errors.CorruptArtifactError`] raised while the folder changed is retried likewise.
    """
    for _ in range(_READ_ATTEMPTS):
        before = ArtifactState.read(folder)
        try:
            result = load()
        except CorruptArtifactError:
            if ArtifactState.read(folder) == before:
                raise
            continue
        if ArtifactState.read(folder) == before:
            return result, before
    raise ConcurrentUpdateError(f"{folder} changed during each of {_READ_ATTEMPTS} attempts to read it")

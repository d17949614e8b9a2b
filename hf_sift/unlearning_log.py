"""The unlearning log: a hash chain of every removal made from an artifact, ending at the published sum.

Each removal appends one entry to `sift_unlearning_log.jsonl` in the artifact's root (one canonical JSON object per
line). An entry holds the removed task's id (or only a salted hash of it), the time, the digest of the sum before
and after, the cost of the replay, the hash of the previous entry and its own hash; never any data. A third party
can check that the history is unbroken (each entry names its predecessor, and each removal starts from the sum the
previous one ended at) and that it ends at the published sum. See docs/FORMAT.md.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import CorruptArtifactError, UnlearningLogError
from .task_id import validate_task_id


LOG_NAME = "sift_unlearning_log.jsonl"
LOG_VERSION = 1

_KEYS = {"cost", "digest_after", "digest_before", "hash", "previous", "time", "version"}
_TASK_KEYS = ("task_id", "task_hash")


def _canonical(entry: Mapping[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """sha256 over an entry's canonical JSON without its own `hash` key."""
    return "sha256:" + hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def redacted_task_id(task_id: str, salt: bytes | str) -> str:
    """The salted hash a redacted entry holds instead of `task_id`: HMAC-SHA256 keyed by `salt`."""
    key = salt.encode("utf-8") if isinstance(salt, str) else bytes(salt)
    return "hmac-sha256:" + hmac.new(key, task_id.encode("utf-8"), hashlib.sha256).hexdigest()


class UnlearningLog:
    """The ordered entries of an artifact's unlearning log (empty for an artifact nothing was removed from).

    Args:
        entries (`list[dict]`, *optional*): Entries as read from a log; checked by [`verify`], not here.
    """

    def __init__(self, entries: list[dict[str, Any]] | None = None):
        self._entries = [dict(e) for e in entries or []]

    @property
    def entries(self) -> list[dict[str, Any]]:
        """The entries, oldest first (copies)."""
        return [dict(e) for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"UnlearningLog(entries={len(self._entries)})"

    def append(
        self,
        task_id: str,
        *,
        digest_before: str,
        digest_after: str,
        cost: Mapping[str, Any],
        redact: bool = False,
        salt: bytes | str | None = None,
        time: datetime.datetime | None = None,
    ) -> dict[str, Any]:
        """Record the removal of one task and return the new entry.

        Args:
            task_id (`str`): The removed task.
            digest_before (`str`): Digest of the sum before the removal.
            digest_after (`str`): Digest of the sum after it.
            cost (`dict`): JSON-serialisable cost of the removal (e.g. replay steps and wall time); never data.
            redact (`bool`, *optional*, defaults to `False`):
                Store only `HMAC-SHA256(salt, task_id)` instead of the id. The salt is never stored.
            salt (`bytes` or `str`, *optional*):
                The redaction key. Keep it to prove later which task an entry removed; without one, a random salt
                is used and forgotten, so nobody can link the entry to the task.
            time (`datetime.datetime`, *optional*): When the removal happened; defaults to now (UTC).

        Raises:
            [`~hf_sift.errors.InvalidTaskIdError`], or [`~hf_sift.errors.UnlearningLogError`] when the log is not an
            unbroken chain, `digest_before` is not where it ends, or `cost` is not a JSON object.
        """
        task_id = validate_task_id(task_id)
        broken = self.verify(None)
        if broken:
            raise UnlearningLogError(f"cannot extend a broken unlearning log: {broken[0]}")
        if self._entries and self._entries[-1].get("digest_after") != digest_before:
            raise UnlearningLogError(
                f"the log ends at {self._entries[-1].get('digest_after')}, not at digest_before={digest_before}"
            )
        try:
            cost = json.loads(json.dumps(dict(cost), sort_keys=True, allow_nan=False))
        except (TypeError, ValueError) as err:
            raise UnlearningLogError(f"`cost` must be a JSON-serialisable mapping: {err}") from None
        when = (time or datetime.datetime.now(datetime.timezone.utc)).astimezone(datetime.timezone.utc)
        entry: dict[str, Any] = {
            "version": LOG_VERSION,
            "time": when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "digest_before": digest_before,
            "digest_after": digest_after,
            "cost": cost,
            "previous": self._entries[-1]["hash"] if self._entries else None,
        }
        if redact:
            entry["task_hash"] = redacted_task_id(task_id, secrets.token_bytes(32) if salt is None else salt)
        else:
            entry["task_id"] = task_id
        entry["hash"] = entry_hash(entry)
        self._entries.append(entry)
        return dict(entry)

    def verify(self, delta_digest: str | None, published: str = "the published sum") -> list[str]:
        """What is wrong with the log, as one sentence per problem (an empty list when the chain holds).

        Checks each entry's keys and own hash, that it names the hash of the one before, that each removal starts
        where the previous one ended, and that the last one ends at `delta_digest`, the published sum's digest.

        Args:
            delta_digest (`str`): Digest of the published sum (None: not checked).
            published (`str`, *optional*): How to name that sum in the problem.
        """
        problems = []
        for i, entry in enumerate(self._entries):
            where = f"{LOG_NAME}: entry {i}"
            keys = set(entry)
            task_keys = keys & set(_TASK_KEYS)
            if keys - task_keys != _KEYS or len(task_keys) != 1:
                problems.append(f"{where} has the keys {sorted(keys)}")
                continue
            if entry["hash"] != entry_hash(entry):
                problems.append(f"{where} does not match its own hash (altered)")
            previous = self._entries[i - 1].get("hash") if i else None
            if entry["previous"] != previous:
                problems.append(f"{where} names {entry['previous']} as the previous entry, not {previous}")
            if i and entry["digest_before"] != self._entries[i - 1].get("digest_after"):
                problems.append(f"{where} starts from a sum other than the one entry {i - 1} ended at")
        if self._entries and delta_digest is not None and self._entries[-1].get("digest_after") != delta_digest:
            last = self._entries[-1].get("digest_after")
            problems.append(f"{LOG_NAME}: the last entry ends at {last}, not at {published} ({delta_digest})")
        return problems

    # ------------------------------------------------------------------ persistence

    def to_bytes(self) -> bytes:
        """The log file's canonical bytes (one sorted, compact JSON object per line)."""
        return b"".join(_canonical(e) + b"\n" for e in self._entries)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = LOG_NAME) -> UnlearningLog:
        """Parse a log file; raise [`~hf_sift.errors.CorruptArtifactError`] naming `source` if it is not one."""
        try:
            entries = [json.loads(line) for line in data.decode("utf-8").splitlines(keepends=True)]
        except (UnicodeDecodeError, ValueError) as err:
            raise CorruptArtifactError(f"{source} is not a valid unlearning log: {err}") from None
        for number, entry in enumerate(entries, start=1):
            if not isinstance(entry, dict):
                raise CorruptArtifactError(f"{source} is not a valid unlearning log: line {number} is not an object")
        log = cls(entries)
        if log.to_bytes() != data:
            raise CorruptArtifactError(f"{source} is not in canonical form (edited by hand or corrupted)")
        return log

    @classmethod
    def load(cls, directory: str | os.PathLike) -> UnlearningLog:
        """The log of the artifact in `directory` (empty when it has none)."""
        path = Path(directory) / LOG_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls()
        return cls.from_bytes(data, str(path))

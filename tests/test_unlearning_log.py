"""The unlearning log: a hash chain of removals ending at the published sum, saved with the artifact."""

from __future__ import annotations

import datetime
import json

import pytest
import torch
from conftest import perturbed

from hf_sift import MergedDelta, TaskVector
from hf_sift.artifact import is_artifact_file
from hf_sift.errors import CorruptArtifactError, UnlearningLogError
from hf_sift.unlearning_log import LOG_NAME, UnlearningLog, entry_hash, redacted_task_id


# Toy state dicts, not models: there is no transformers checkpoint to write the plain merge P from, so these
# artifacts are format 1 by design (format 2 is exercised by the tests built on real tiny models).
pytestmark = pytest.mark.filterwarnings("ignore:this delta records no base model:UserWarning")


SEED = 5
BASE = {
    "a.weight": torch.randn(6, 5, generator=torch.Generator().manual_seed(0)),
    "b.bias": torch.randn(9, generator=torch.Generator().manual_seed(1)),
}
VECTORS = {f"t{i}": TaskVector.from_state_dicts(BASE, perturbed(BASE, i, scale=0.1), SEED) for i in range(4)}
WHEN = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)


def merge(task_ids) -> MergedDelta:
    delta = MergedDelta(BASE, SEED)
    for task_id in task_ids:
        delta.add(task_id, VECTORS[task_id])
    return delta


def unlearned(removed=("t1", "t3"), **append) -> MergedDelta:
    delta = merge(VECTORS)
    for task_id in removed:
        before = delta.digest
        delta.remove(task_id, VECTORS[task_id])
        delta.log.append(
            task_id, digest_before=before, digest_after=delta.digest, cost={"steps": 3}, time=WHEN, **append
        )
    return delta


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_entries_chain_and_end_at_the_sum():
    delta = unlearned()
    first, second = delta.log.entries
    assert first["previous"] is None and second["previous"] == first["hash"]
    assert first["hash"] == entry_hash(first) and second["hash"] == entry_hash(second)
    assert second["digest_before"] == first["digest_after"] and second["digest_after"] == delta.digest
    assert first["task_id"] == "t1" and second["task_id"] == "t3"
    assert first["time"] == "2026-01-02T03:04:05.000000Z" and first["cost"] == {"steps": 3}
    assert delta.log.verify(delta.digest) == []
    assert delta.log.verify(merge(VECTORS).digest) == [
        f"{LOG_NAME}: the last entry ends at {delta.digest}, not at the published sum ({merge(VECTORS).digest})"
    ]


def test_append_refuses_an_entry_that_does_not_continue_the_chain():
    delta = unlearned()
    entries = delta.log.entries
    with pytest.raises(UnlearningLogError, match="the log ends at"):
        delta.log.append("t0", digest_before=merge(VECTORS).digest, digest_after=delta.digest, cost={})
    with pytest.raises(UnlearningLogError, match="JSON"):
        delta.log.append("t0", digest_before=delta.digest, digest_after=delta.digest, cost={"x": object()})
    assert delta.log.entries == entries
    altered = UnlearningLog([{**entries[0], "cost": {"steps": 4}}, entries[1]])
    with pytest.raises(UnlearningLogError, match="cannot extend a broken unlearning log: .* entry 0 does not match"):
        altered.append("t0", digest_before=delta.digest, digest_after=delta.digest, cost={})


def test_redacted_entries_hold_only_a_salted_hash():
    delta = unlearned(redact=True, salt=b"secret salt")
    data = delta.log.to_bytes()
    assert b"t1" not in data and b"secret" not in data and b"task_id" not in data
    assert [e["task_hash"] for e in delta.log.entries] == [redacted_task_id(t, b"secret salt") for t in ("t1", "t3")]
    assert delta.log.verify(delta.digest) == []
    unsalted = unlearned(redact=True)  # a random salt, forgotten: the entries cannot be linked to a task
    assert unsalted.log.entries[0]["task_hash"] != redacted_task_id("t1", b"secret salt")
    assert unsalted.log.entries[0]["task_hash"] != unsalted.log.entries[1]["task_hash"]


def test_verify_finds_altered_and_reordered_entries():
    delta = unlearned(removed=("t0", "t1", "t2"))
    entries = delta.log.entries
    altered = [dict(e) for e in entries]
    altered[1]["task_id"] = "t9"
    assert UnlearningLog(altered).verify(delta.digest) == [
        f"{LOG_NAME}: entry 1 does not match its own hash (altered)"
    ]
    rehashed = [dict(e) for e in altered]
    rehashed[1]["hash"] = entry_hash(rehashed[1])
    problems = UnlearningLog(rehashed).verify(delta.digest)
    assert problems == [
        f"{LOG_NAME}: entry 2 names {entries[1]['hash']} as the previous entry, not {rehashed[1]['hash']}"
    ]
    dropped = UnlearningLog([entries[0], entries[2]]).verify(delta.digest)
    assert len(dropped) == 2 and "entry 1 names" in dropped[0] and "entry 1 starts from a sum" in dropped[1]
    assert UnlearningLog([{**entries[0], "extra": 1}]).verify(None) == [
        f"{LOG_NAME}: entry 0 has the keys {sorted([*entries[0], 'extra'])}"
    ]


def test_saved_with_the_artifact_and_loaded_back(tmp_path):
    delta = unlearned()
    delta.save_pretrained(tmp_path / "unlearned")
    merge(["t0", "t2"]).save_pretrained(tmp_path / "fresh")
    saved, fresh = files(tmp_path / "unlearned"), files(tmp_path / "fresh")
    assert saved.pop(LOG_NAME) == delta.log.to_bytes()
    assert saved == fresh  # the log is the only difference: the config, manifest, sum and masks are identical
    assert LOG_NAME not in fresh and is_artifact_file(LOG_NAME)

    loaded = MergedDelta.from_pretrained(tmp_path / "unlearned")
    assert loaded.log.entries == delta.log.entries and loaded.log.verify(loaded.digest) == []
    lines = (tmp_path / "unlearned" / LOG_NAME).read_bytes().splitlines()
    assert [json.loads(line) for line in lines] == delta.log.entries

    merge(["t0"]).save_pretrained(tmp_path / "unlearned", overwrite=True)  # replaces every artifact file, the log too
    assert LOG_NAME not in files(tmp_path / "unlearned")
    assert len(MergedDelta.from_pretrained(tmp_path / "unlearned").log) == 0


def test_a_corrupted_log_file_is_named(tmp_path):
    data = unlearned().log.to_bytes()
    with pytest.raises(CorruptArtifactError, match="log.jsonl is not a valid unlearning log"):
        UnlearningLog.from_bytes(data[:-5] + b"\n")
    with pytest.raises(CorruptArtifactError, match="not in canonical form"):
        UnlearningLog.from_bytes(data.replace(b'":', b'": '))
    with pytest.raises(CorruptArtifactError, match="line 2 is not an object"):
        UnlearningLog.from_bytes(data.splitlines(keepends=True)[0] + b"[1]\n")
    assert UnlearningLog.from_bytes(data).to_bytes() == data


def test_the_log_is_written_in_the_same_atomic_save(tmp_path, monkeypatch):
    delta = unlearned(removed=("t1",))
    delta.save_pretrained(tmp_path / "artifact")
    before = files(tmp_path / "artifact")
    before_digest = delta.digest
    delta.remove("t3", VECTORS["t3"])
    delta.log.append("t3", digest_before=before_digest, digest_after=delta.digest, cost={}, time=WHEN)

    def crash(data, path):
        raise OSError("disk full")

    monkeypatch.setattr("hf_sift.artifact._dump_json", crash)
    with pytest.raises(OSError, match="disk full"):
        delta.save_pretrained(tmp_path / "artifact")
    assert files(tmp_path / "artifact") == before
    monkeypatch.undo()
    delta.save_pretrained(tmp_path / "artifact")
    assert len(MergedDelta.from_pretrained(tmp_path / "artifact").log) == 2

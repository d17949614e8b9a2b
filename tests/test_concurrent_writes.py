"""Two writers on one artifact folder: every save is a compare-and-swap, so no task is ever silently lost."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch
from artifact_writers import merge, serve, task_vector

from hf_sift import MergedDelta
from hf_sift.errors import ConcurrentUpdateError, CorruptArtifactError


# Toy state dicts, not models: there is no transformers checkpoint to write the plain merge P from, so these
# artifacts are format 1 by design (format 2 is exercised by the tests built on real tiny models).
pytestmark = pytest.mark.filterwarnings("ignore:this delta records no base model:UserWarning")


ROUNDS = 50
REPLY_TIMEOUT = 60


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def saved_bytes(task_ids: list[str], folder: Path) -> dict[str, bytes]:
    merge(task_ids).save_pretrained(folder)
    return snapshot(folder)


def reply(conn, timeout: float = REPLY_TIMEOUT):
    assert conn.poll(timeout), "the writer process did not answer"
    status, value = conn.recv()
    assert status == "ok", value
    return value


@pytest.fixture(scope="module")
def spawn():
    return multiprocessing.get_context("spawn")


@pytest.fixture(scope="module")
def writers(spawn):
    """Two long-lived writer processes sharing a barrier, driven over pipes."""
    barrier = spawn.Barrier(2)
    conns, processes = [], []
    for _ in range(2):
        parent, child = spawn.Pipe()
        process = spawn.Process(target=serve, args=(child, barrier), daemon=True)
        process.start()
        conns.append(parent)
        processes.append(process)
    yield conns
    for conn, process in zip(conns, processes):
        conn.send(None)
        process.join(10)
        if process.is_alive():
            process.kill()


@pytest.mark.parametrize("retry", [True, False], ids=["retry", "report"])
def test_two_writers_in_two_processes_never_lose_a_task(writers, tmp_path, retry):
    rng = random.Random(int(retry))
    for round_ in range(ROUNDS):
        folder = tmp_path / f"round-{round_}"
        merge(["a"]).save_pretrained(folder)
        # Even rounds: both writers have loaded before either saves, so one of them must conflict. Odd rounds: loads
        # and saves overlap at random.
        use_barrier = round_ % 2 == 0
        for conn, task_id in zip(writers, "bc"):
            delays = rng.uniform(0, 0.004), rng.uniform(0, 0.004)
            conn.send(("round", str(folder), task_id, retry, use_barrier, *delays))
        results = {task_id: reply(conn) for conn, task_id in zip(writers, "bc")}

        saved = sorted(t for t, r in results.items() if r["outcome"] == "saved")
        final = MergedDelta.from_pretrained(folder)
        assert final.task_ids == ["a", *saved], (round_, results)
        assert final.digest == merge(final.task_ids).digest
        if retry:
            assert saved == ["b", "c"], (round_, results)
        conflicts = {t: r["conflicts"] for t, r in results.items()}
        assert sum(conflicts.values()) == 1 if use_barrier else sum(conflicts.values()) <= 1, (round_, results)
        for task_id, result in results.items():
            other = "c" if task_id == "b" else "b"
            for message in result["messages"]:  # the writer that lost the race is told what the other one did
                assert f"added task(s) {[other]}" in message, message
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{folder.name}")] == []


def test_a_writer_killed_while_holding_the_lock_does_not_block_the_next(spawn, writers, tmp_path):
    folder = tmp_path / "merged"
    merge(["a"]).save_pretrained(folder)
    before = snapshot(folder)
    parent, child = spawn.Pipe()
    victim = spawn.Process(target=serve, args=(child,), daemon=True)
    victim.start()
    try:
        parent.send(("hang_in_swap", str(folder), "b"))
        assert parent.poll(REPLY_TIMEOUT) and parent.recv() == "holding"
        writers[0].send(("round", str(folder), "c", False, False, 0.0, 0.0))
        assert not writers[0].poll(0.5), "a second writer saved while the first held the lock"
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
    finally:
        if victim.is_alive():
            victim.kill()
    assert snapshot(folder) == before  # the killed writer never swapped its folder in
    assert reply(writers[0]) == {"outcome": "saved", "conflicts": 0, "messages": []}
    assert snapshot(folder) == saved_bytes(["a", "c"], tmp_path / "expected")
    assert not (tmp_path / ".merged.lock").exists()


def test_a_fresh_delta_never_replaces_an_artifact_unless_told(tmp_path):
    folder = tmp_path / "merged"
    merge(["a"]).save_pretrained(folder)
    (folder / "README.md").write_text("mine")
    before = snapshot(folder)
    with pytest.raises(ConcurrentUpdateError, match=r"holds an artifact \(task\(s\) \['a'\]\).*overwrite=True"):
        merge(["b"]).save_pretrained(folder)
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]

    merge(["b"]).save_pretrained(folder, overwrite=True)
    expected = saved_bytes(["b"], tmp_path / "expected")
    assert snapshot(folder) == {**expected, "README.md": b"mine"}

    merge(["c"]).save_pretrained(tmp_path / "no-artifact-yet")  # an empty or missing folder is fine
    (tmp_path / "only-user-files").mkdir()
    (tmp_path / "only-user-files" / "notes.txt").write_text("x")
    merge(["c"]).save_pretrained(tmp_path / "only-user-files")


def test_a_stale_delta_is_refused_and_told_what_changed(tmp_path):
    folder = tmp_path / "merged"
    merge(["a", "b"]).save_pretrained(folder)
    first, second = MergedDelta.from_pretrained(folder), MergedDelta.from_pretrained(folder)
    first.add("c", task_vector("c"))
    first.remove("b", task_vector("b"))
    first.save_pretrained(folder)
    after_first = snapshot(folder)

    second.add("d", task_vector("d"))
    with pytest.raises(ConcurrentUpdateError, match=r"added task\(s\) \['c'\] and removed task\(s\) \['b'\]"):
        second.save_pretrained(folder)
    assert snapshot(folder) == after_first  # left exactly as the other writer made it

    first.add("e", task_vector("e"))
    first.save_pretrained(folder)  # the delta remembers the state it saved: saving again is no conflict

    retried = MergedDelta.from_pretrained(folder)  # the documented retry: reload, reapply, save
    retried.add("d", task_vector("d"))
    retried.save_pretrained(folder)
    assert MergedDelta.from_pretrained(folder).task_ids == ["a", "c", "d", "e"]

    shutil.rmtree(folder)
    with pytest.raises(ConcurrentUpdateError, match="deleted"):
        first.save_pretrained(folder)
    assert not folder.exists()


def test_a_save_landing_while_another_stages_is_reported_as_such(tmp_path, monkeypatch):
    """The other writer swaps the folder while this one hard-links its masks from it: a conflict, not an OSError."""
    import hf_sift.artifact as artifact

    folder = tmp_path / "merged"
    merge(["a", "b"]).save_pretrained(folder)
    stale, other = MergedDelta.from_pretrained(folder), MergedDelta.from_pretrained(folder)
    stale.add("c", task_vector("c"))
    other.remove("b", task_vector("b"))
    real_link = artifact.link_or_copy
    raced = []

    def link_racing_a_save(source, target):
        if not raced:
            raced.append(True)
            other.save_pretrained(folder)  # removes masks/b.safetensors before this writer links it
        real_link(source, target)

    monkeypatch.setattr(artifact, "link_or_copy", link_racing_a_save)
    with pytest.raises(ConcurrentUpdateError, match=r"removed task\(s\) \['b'\]") as err:
        stale.save_pretrained(folder)
    # The vanished mask (reported by the artifact writer as missing) is the context of the conflict.
    assert isinstance(err.value.__context__, CorruptArtifactError)
    assert "masks/b.safetensors" in str(err.value.__context__)
    monkeypatch.undo()
    assert snapshot(folder) == saved_bytes(["a"], tmp_path / "expected")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expected", "merged"]


def test_same_tasks_rewritten_is_still_a_conflict(tmp_path):
    folder = tmp_path / "merged"
    merge(["a"]).save_pretrained(folder)
    stale = MergedDelta.from_pretrained(folder)
    other = MergedDelta.from_pretrained(folder)
    other.base_model = "renamed"
    other.save_pretrained(folder)
    with pytest.raises(ConcurrentUpdateError, match=r"rewrote it \(same task\(s\) \['a'\]"):
        stale.save_pretrained(folder)


def test_a_loaded_delta_saved_elsewhere(tmp_path):
    merge(["a"]).save_pretrained(tmp_path / "A")
    merge(["z"]).save_pretrained(tmp_path / "B")
    shutil.copytree(tmp_path / "A", tmp_path / "copy-of-A")
    delta = MergedDelta.from_pretrained(tmp_path / "A")
    delta.add("b", task_vector("b"))
    before = snapshot(tmp_path / "B")
    with pytest.raises(ConcurrentUpdateError, match=r"\['z'\]"):
        delta.save_pretrained(tmp_path / "B")
    assert snapshot(tmp_path / "B") == before
    delta.save_pretrained(tmp_path / "copy-of-A")  # holds the very state the delta was loaded from
    delta.save_pretrained(tmp_path / "new")
    delta.save_pretrained(tmp_path / "A")  # A still holds what was loaded from it
    assert snapshot(tmp_path / "A") == snapshot(tmp_path / "new") == snapshot(tmp_path / "copy-of-A")
    delta.save_pretrained(tmp_path / "B", overwrite=True)
    assert snapshot(tmp_path / "B") == snapshot(tmp_path / "A")


def test_a_load_during_a_save_reads_one_state(tmp_path, monkeypatch):
    """A writer swaps the folder while a reader streams Q: the reader starts over and gets one consistent state."""
    import hf_sift.delta_persistence as delta_persistence

    folder = tmp_path / "merged"
    merge(["a"]).save_pretrained(folder)
    writer = MergedDelta.from_pretrained(folder)
    writer.add("b", task_vector("b"))
    real_iter_delta = delta_persistence.iter_delta
    calls = []

    def iter_delta_racing_a_save(*args, **kwargs):
        if not calls:
            writer.save_pretrained(folder)
        calls.append(1)
        return real_iter_delta(*args, **kwargs)

    monkeypatch.setattr(delta_persistence, "iter_delta", iter_delta_racing_a_save)
    loaded = MergedDelta.from_pretrained(folder)
    assert loaded.task_ids == ["a", "b"] and loaded.digest == merge(["a", "b"]).digest
    loaded.add("c", task_vector("c"))
    loaded.save_pretrained(folder)  # its remembered state is the one it read


def test_train_tasks_refuses_to_overwrite_another_writer(tmp_path):
    from trainer_fixtures import sift_args, task_dataset, tiny_model
    from transformers import TrainerCallback

    from hf_sift.trainer import train_tasks

    folder = tmp_path / "merged"

    class OtherWriter(TrainerCallback):
        """While t1 trains, another process merges a task into the artifact saved after t0."""

        def on_train_begin(self, args, state, control, **kwargs):
            if args.task_id == "t1":
                other = MergedDelta.from_pretrained(folder)
                zero = {n: torch.zeros_like(t) for n, t in other.sum.items()}
                other.absorb(zero, {"x": other.record("t0")}, {"x": other.load_mask("t0")}, source=other)
                other.save_pretrained(folder)

    data = task_dataset(num_tasks=2)
    with pytest.raises(ConcurrentUpdateError, match=r"added task\(s\) \['x'\]"):
        train_tasks(tiny_model(), data, "task", sift_args(tmp_path / "runs"), folder, callbacks=[OtherWriter()])
    assert MergedDelta.from_pretrained(folder).task_ids == ["t0", "x"]  # as the other writer left it
    resumed = train_tasks(tiny_model(), data, "task", sift_args(tmp_path / "runs"), folder)
    assert resumed.task_ids == MergedDelta.from_pretrained(folder).task_ids == ["t0", "t1", "x"]


def test_a_symlinked_folder_is_the_folder_it_points_to(tmp_path):
    """Saving through a symlink updates (and locks) the folder it points to; the symlink stays."""
    real, link = tmp_path / "real", tmp_path / "link"
    merge(["a"]).save_pretrained(real)
    link.symlink_to(real, target_is_directory=True)
    via_link, via_real = MergedDelta.from_pretrained(link), MergedDelta.from_pretrained(real)
    via_real.add("b", task_vector("b"))
    via_real.save_pretrained(real)
    via_link.add("c", task_vector("c"))
    with pytest.raises(ConcurrentUpdateError, match=r"added task\(s\) \['b'\]"):
        via_link.save_pretrained(link)
    retried = MergedDelta.from_pretrained(link)
    retried.add("c", task_vector("c"))
    retried.save_pretrained(link)
    assert link.is_symlink()
    assert MergedDelta.from_pretrained(real).task_ids == ["a", "b", "c"]
    via_real.add("d", task_vector("d"))
    with pytest.raises(ConcurrentUpdateError, match=r"added task\(s\) \['c'\]"):
        via_real.save_pretrained(real)


def test_without_renameat2_and_after_an_interrupted_swap(tmp_path, monkeypatch):
    """The two-rename swap (other platforms) is serialised by the same lock; its crash window is repaired first."""
    monkeypatch.setattr("hf_sift.atomic._renameat2_exchange", lambda a, b: False)
    folder = tmp_path / "merged"
    merge(["a"]).save_pretrained(folder)
    first, second = MergedDelta.from_pretrained(folder), MergedDelta.from_pretrained(folder)
    first.add("b", task_vector("b"))
    first.save_pretrained(folder)
    second.add("c", task_vector("c"))
    with pytest.raises(ConcurrentUpdateError, match=r"added task\(s\) \['b'\]"):
        second.save_pretrained(folder)
    folder.rename(tmp_path / ".merged.previous")  # a writer died between its two renames
    first.add("c", task_vector("c"))
    first.save_pretrained(folder)  # the backup is restored before the state is checked
    assert snapshot(folder) == saved_bytes(["a", "b", "c"], tmp_path / "expected")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expected", "merged"]


def test_the_state_files_are_the_artifacts_config_and_manifest():
    from hf_sift.artifact import CONFIG_NAME, MANIFEST_NAME
    from hf_sift.artifact_state import STATE_FILES

    assert STATE_FILES == (CONFIG_NAME, MANIFEST_NAME)


def test_the_lock_without_fcntl_uses_msvcrt(tmp_path, monkeypatch):
    """Windows has no fcntl: the lock falls back to msvcrt.locking (simulated here by a fake module)."""
    import sys
    import threading
    import time
    import types

    import hf_sift.folder_lock as folder_lock

    held, calls = set(), []

    def locking(fd, mode, nbytes):
        assert nbytes == 1 and os.lseek(fd, 0, os.SEEK_CUR) == 0
        key = os.fstat(fd).st_ino
        calls.append(mode)
        if mode == fake.LK_NBLCK:
            if key in held:
                raise OSError("locked")
            held.add(key)
        else:
            held.remove(key)

    fake = types.SimpleNamespace(LK_NBLCK=2, LK_UNLCK=0, locking=locking)
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    monkeypatch.setattr(folder_lock, "fcntl", None)
    order = []
    entered = threading.Event()

    def first():
        with folder_lock.folder_lock(tmp_path / "merged"):
            entered.set()
            time.sleep(0.2)
            order.append("first")

    thread = threading.Thread(target=first)
    thread.start()
    entered.wait(10)
    with folder_lock.folder_lock(tmp_path / "merged"):
        order.append("second")
    thread.join()
    assert order == ["first", "second"] and not held
    assert calls.count(fake.LK_UNLCK) == 2 and calls.count(fake.LK_NBLCK) > 2  # the second waited
    assert (tmp_path / ".merged.lock").exists()  # left in place on Windows


def test_a_user_file_that_is_a_relative_link_stays_that_link(tmp_path):
    """A save keeps the user's files as they are: a relative symbolic link stays the same link, resolving to the same
    file (the staging folder is a sibling of the artifact's)."""
    folder = tmp_path / "snapshot"
    merge(["a"]).save_pretrained(folder)
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "tok").write_bytes(b'{"model_max_length": 8}')
    (folder / "tokenizer_config.json").symlink_to(Path("..") / "blobs" / "tok")
    delta = MergedDelta.from_pretrained(folder)
    delta.add("b", task_vector("b"))
    delta.save_pretrained(folder)
    kept = folder / "tokenizer_config.json"
    assert kept.is_symlink() and os.readlink(kept) == str(Path("..") / "blobs" / "tok")
    assert kept.read_bytes() == b'{"model_max_length": 8}'
    assert MergedDelta.from_pretrained(folder).task_ids == ["a", "b"]

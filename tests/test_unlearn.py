"""hf_sift.unlearn: replay, check and remove tasks in one atomic save; refusals leave the artifact byte-identical."""

from __future__ import annotations

import importlib
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from trainer_fixtures import sift_args, task_dataset, tiny_model

from hf_sift import MergedDelta, unlearn
from hf_sift.errors import (
    EnvironmentMismatchError,
    ReplayPreconditionError,
    SignSeedMismatchError,
    TaskDigestMismatchError,
    UnknownTaskError,
)
from hf_sift.trainer import train_tasks
from hf_sift.unlearning_log import LOG_NAME


FORGET = ["t1", "t3"]


def folder_bytes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in skip
    }


class Collator:
    """A plain collator whose behaviour a test can perturb without changing its recorded identity."""

    def __call__(self, rows):
        ids = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Five tasks merged (with a task-vector store) and a fresh merge of the three that remain."""
    root = tmp_path_factory.mktemp("unlearn")
    data = task_dataset(num_tasks=5, rows_per_task=4)
    args = sift_args(root / "runs", max_steps=2)
    train_tasks(
        tiny_model(), data, "task", args, root / "five", data_collator=Collator(), task_vector_store=root / "store"
    )
    keep = [t for t in ["t0", "t1", "t2", "t3", "t4"] if t not in FORGET]
    train_tasks(tiny_model(), data, "task", args, root / "three", tasks=keep, data_collator=Collator())
    return root, data


def copy_of(trained, tmp_path) -> Path:
    root, _ = trained
    shutil.copytree(root / "five", tmp_path / "artifact")
    return tmp_path / "artifact"


def test_unlearning_two_tasks_equals_a_fresh_merge_of_the_others(trained, tmp_path):
    root, data = trained
    artifact = copy_of(trained, tmp_path)
    before = MergedDelta.from_pretrained(artifact).digest
    report = unlearn(artifact, FORGET, model=tiny_model(), dataset=data, data_collator=Collator())
    assert folder_bytes(artifact, skip=(LOG_NAME,)) == folder_bytes(root / "three")
    after = MergedDelta.from_pretrained(artifact)
    assert after.digest == MergedDelta.from_pretrained(root / "three").digest == report.digest_after
    assert [t.task_id for t in report.tasks] == FORGET and report.digest_before == before
    assert [t.source for t in report.tasks] == ["replay", "replay"] and report.replay_steps == 4
    assert after.log.verify(after.digest) == []
    entries = after.log.entries
    assert [e["task_id"] for e in entries] == FORGET
    assert entries[0]["digest_before"] == before and entries[-1]["digest_after"] == after.digest


def test_unlearning_from_the_store_trains_nothing(trained, tmp_path, monkeypatch):
    root, _ = trained
    artifact = copy_of(trained, tmp_path)

    def no_training(*args, **kwargs):
        raise AssertionError("unlearning from the store must not train")

    monkeypatch.setattr(importlib.import_module("hf_sift.trainer.multi_task"), "train_task", no_training)
    monkeypatch.setattr("transformers.Trainer.train", no_training)
    report = unlearn(artifact, FORGET, task_vector_store=root / "store", redact=True, salt="pepper")
    assert folder_bytes(artifact, skip=(LOG_NAME,)) == folder_bytes(root / "three")
    assert [t.source for t in report.tasks] == ["store", "store"] and report.replay_steps == 0
    log = MergedDelta.from_pretrained(artifact).log
    assert log.verify(report.digest_after) == [] and all("task_id" not in e for e in log.entries)


def _edit_recipe(artifact: Path, task_id: str, edit) -> None:
    import json

    path = artifact / "sift_manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest["tasks"][task_id]["metadata"]["recipe"])
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _changed_row(data):
    index = data["task"].index("t1")
    return data.map(lambda r, i: {"input_ids": [(r["input_ids"][0] + 1) % 64, *r["input_ids"][1:]]} if i == index else {}, with_indices=True)  # fmt: skip


def _reordered(data):
    rows = [i for i, t in enumerate(data["task"]) if t == "t1"]
    order = list(range(len(data)))
    order[rows[0]], order[rows[1]] = rows[1], rows[0]
    return data.select(order)


def _row_added(data):
    from datasets import concatenate_datasets

    return concatenate_datasets([data, data.select([data["task"].index("t1")])])


@pytest.mark.parametrize(
    "change, error, words",
    [
        ("row", ReplayPreconditionError, "rows of task 't1'"),
        ("order", ReplayPreconditionError, "rows of task 't1'"),
        ("added", ReplayPreconditionError, "recorded 4 rows"),
        ("learning_rate", ReplayPreconditionError, "learning_rate: recorded 0.01, now 0.02"),
        ("sign_seed", SignSeedMismatchError, "has sign_seed=8.*the merge has sign_seed=7"),
        ("recorded_sign_seed", ReplayPreconditionError, "records sign_seed=8, the artifact has 7"),
        ("threads", EnvironmentMismatchError, "threads"),
        ("collator", ReplayPreconditionError, "data_collator"),
        ("unknown", UnknownTaskError, "unknown task"),
    ],
)
def test_refused_before_training_and_the_artifact_is_unchanged(trained, tmp_path, monkeypatch, change, error, words):
    _, data = trained
    artifact = copy_of(trained, tmp_path)
    tasks, collator, args = ["t1"], Collator(), None
    if change == "row":
        data = _changed_row(data)
    elif change == "order":
        data = _reordered(data)
    elif change == "added":
        data = _row_added(data)
    elif change == "learning_rate":
        args = sift_args(tmp_path / "runs", max_steps=2, learning_rate=0.02)
    elif change == "sign_seed":
        args = sift_args(tmp_path / "runs", max_steps=2, sign_seed=8)
    elif change == "recorded_sign_seed":
        _edit_recipe(artifact, "t1", lambda r: r["training_arguments"].update(sign_seed=8))
    elif change == "threads":
        from hf_sift.trainer import environment

        probe = environment.probe_environment

        def other_threads(*args, **kwargs):
            environment = probe(*args, **kwargs)
            environment["cpu"]["threads"] += 5
            return environment

        monkeypatch.setattr(environment, "probe_environment", other_threads)
    elif change == "collator":
        collator = None
    elif change == "unknown":
        tasks = ["t9"]
    before = folder_bytes(artifact)

    def no_training(*args, **kwargs):
        raise AssertionError("a refused unlearning must not train")

    monkeypatch.setattr("transformers.Trainer.train", no_training)
    with pytest.raises(error, match=words):
        unlearn(artifact, tasks, model=tiny_model(), dataset=data, data_collator=collator, args=args)
    assert folder_bytes(artifact) == before


def test_dry_run_reports_the_cost_and_changes_nothing(trained, tmp_path, monkeypatch):
    _, data = trained
    artifact = copy_of(trained, tmp_path)
    before = folder_bytes(artifact)
    monkeypatch.setattr("transformers.Trainer.train", lambda *a, **k: pytest.fail("a dry run must not train"))
    report = unlearn(artifact, FORGET, model=tiny_model(), dataset=data, data_collator=Collator(), dry_run=True)
    assert report.dry_run and report.replay_steps == 4 and report.digest_after is None
    assert "dry run" in str(report)
    assert folder_bytes(artifact) == before


def test_a_replay_that_differs_is_refused_naming_the_tensors(trained, tmp_path, monkeypatch):
    _, data = trained
    artifact = copy_of(trained, tmp_path)
    before = folder_bytes(artifact)
    plain = Collator.__call__

    def perturbed(self, rows):
        batch = plain(self, rows)
        batch["labels"] = batch["labels"].roll(1, dims=1)
        return batch

    monkeypatch.setattr(Collator, "__call__", perturbed)  # same class and state, other batches
    with pytest.raises(TaskDigestMismatchError, match=r"tensors differ: model\.layers\.\d+\.\S+ \(\d+ of \d+"):
        unlearn(artifact, ["t0", "t1"], model=tiny_model(), dataset=data, data_collator=Collator())
    assert folder_bytes(artifact) == before


def test_a_crash_before_the_save_leaves_the_artifact_intact(trained, tmp_path, monkeypatch):
    root, _ = trained
    artifact = copy_of(trained, tmp_path)
    before = folder_bytes(artifact)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr("hf_sift.atomic._swap_into_place", crash)  # inside the save, after the replay
    with pytest.raises(RuntimeError, match="simulated crash"):
        unlearn(artifact, FORGET, task_vector_store=root / "store")
    assert folder_bytes(artifact) == before
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["artifact"]  # no staging folder left behind


def test_the_unlearn_command(tmp_path, capsys):
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hf_sift.cli import main

    words = [f"w{i}" for i in range(60)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    tiny_model().save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"text": " ".join(words[(i * 7 + j) % 60] for j in range(10)), "who": f"a{i % 2}"} for i in range(8)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", str(tmp_path / "model"), "--data", str(data), "--task_column", "who", "--max_length", "12",
              "--output_dir", str(tmp_path / "runs"), "--max_steps", "2", "--per_device_train_batch_size", "2",
              "--report_to", "none", "--disable_tqdm", "true"]  # fmt: skip
    assert main(["train", *common, "--artifact_dir", str(tmp_path / "merged")]) == 0
    assert main(["train", *common, "--artifact_dir", str(tmp_path / "a1"), "--tasks", "a1"]) == 0
    unlearn_argv = ["unlearn", str(tmp_path / "merged"), "--task", "a0", "--data", str(data), "--task-column", "who",
                    "--max-length", "12"]  # fmt: skip
    before = folder_bytes(tmp_path / "merged")
    capsys.readouterr()

    assert main([*unlearn_argv[:4], "--task", "nobody", *unlearn_argv[4:]]) == 2
    assert capsys.readouterr().err == "hf-sift: error: unknown task 'nobody'; merged tasks: 'a0', 'a1'\n"
    assert main([*unlearn_argv, "--max-length", "11"]) == 2  # other rows than the recorded ones
    assert "rows of task 'a0'" in capsys.readouterr().err
    assert main([*unlearn_argv, "--dry-run"]) == 0
    assert "dry run: would unlearn 1 task(s)" in capsys.readouterr().out
    assert folder_bytes(tmp_path / "merged") == before

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(unlearn_argv) == 0
    assert "unlearned 1 task(s)" in capsys.readouterr().out
    # torch's "pin_memory ... no accelerator" warning of every CPU replay is not printed by the CLI
    assert not [w for w in caught if "pin_memory" in str(w.message)]
    assert folder_bytes(tmp_path / "merged", skip=(LOG_NAME,)) == folder_bytes(tmp_path / "a1")


def test_unlearning_a_task_trained_with_an_adapter(tmp_path):
    from peft import LoraConfig

    def lora(alpha: int = 4) -> LoraConfig:
        return LoraConfig(r=2, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)

    data = task_dataset(num_tasks=2, rows_per_task=4)
    args = sift_args(tmp_path / "runs", max_steps=2)
    train_tasks(tiny_model(), data, "task", args, tmp_path / "both", peft_config=lora())
    train_tasks(tiny_model(), data, "task", args, tmp_path / "t1", peft_config=lora(), tasks=["t1"])
    before = folder_bytes(tmp_path / "both")
    with pytest.raises(ReplayPreconditionError, match="peft.default.lora_alpha: recorded 4, now 8"):
        unlearn(tmp_path / "both", ["t0"], model=tiny_model(), dataset=data, peft_config=lora(8))
    assert folder_bytes(tmp_path / "both") == before
    unlearn(tmp_path / "both", ["t0"], model=tiny_model(), dataset=data, peft_config=lora())
    assert folder_bytes(tmp_path / "both", skip=(LOG_NAME,)) == folder_bytes(tmp_path / "t1")


def test_a_stored_task_vector_of_another_task_is_refused(trained, tmp_path):
    from hf_sift import TaskVectorStore

    root, _ = trained
    artifact = copy_of(trained, tmp_path)
    before = folder_bytes(artifact)
    source = TaskVectorStore(root / "store")
    wrong = TaskVectorStore(tmp_path / "wrong")
    wrong.put("t1", source.get("t0"), record=source.record("t0"))
    with pytest.raises(TaskDigestMismatchError, match="another task vector for 't1'"):
        unlearn(artifact, ["t1"], task_vector_store=tmp_path / "wrong")
    wrong.discard("t1")
    wrong.put("t1", source.get("t0"))  # no record kept with it: the digest check of `get` refuses it
    with pytest.raises(TaskDigestMismatchError):
        unlearn(artifact, ["t1"], task_vector_store=tmp_path / "wrong")
    assert folder_bytes(artifact) == before

"""train_tasks: one SIFT run per task, the artifact after every task, restart, and sharding over processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from trainer_fixtures import free_port, set_distributed_env, sift_args, task_dataset, tiny_model
from transformers import TrainerCallback

from hf_sift import MergedDelta, TaskVectorStore, unlearn
from hf_sift.digest import state_dict_digest
from hf_sift.errors import BaseModelMismatchError, MixedRecipeError
from hf_sift.trainer import SIFTTrainer, train_tasks
from hf_sift.trainer.recipe import Recipe, rows_digest
from hf_sift.trainer.sift_config import derive_seed


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_each_task_matches_a_lone_run_and_the_model_is_reset(tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = task_dataset()
    delta = train_tasks(model, data, "task", sift_args(tmp_path / "runs"), tmp_path / "merged")
    assert delta.task_ids == ["t0", "t1", "t2"]
    for name, tensor in model.state_dict().items():  # back at θ0, in place
        assert torch.equal(tensor, before[name]), name
    loaded = MergedDelta.from_pretrained(tmp_path / "merged")
    assert loaded.digest == delta.digest and loaded.task_ids == delta.task_ids
    # The whole base (embeddings, LM head) at θ0 is recorded and checkable before a replay.
    assert loaded.base_model_digest == state_dict_digest(before)
    loaded.check_base_model(model.state_dict())
    other = {k: v + 1 if k == "model.embed_tokens.weight" else v for k, v in before.items()}
    with pytest.raises(BaseModelMismatchError):
        loaded.check_base_model(other)
    total = None
    for task_id in delta.task_ids:
        subset = data.select([i for i, t in enumerate(data["task"]) if t == task_id])
        alone = SIFTTrainer(
            model=tiny_model(), args=sift_args(tmp_path / "alone", task_id=task_id), train_dataset=subset
        )
        alone.train()
        task_vector = alone.task_vector()
        record = loaded.record(task_id)
        assert record["digest"] == task_vector.digest
        # The data is identified by content (the recipe's rows digest), not by how the dataset was built.
        assert "data_fingerprint" not in record["metadata"]
        assert record["metadata"]["recipe"]["rows"] == {"count": len(subset), "digest": rows_digest(subset)}
        assert record["metadata"]["task_id"] == task_id and "train_loss" in record["metadata"]
        mask = loaded.load_mask(task_id)
        assert all(torch.equal(mask[n], task_vector.packed_masks[n]) for n in task_vector.q)
        total = dict(task_vector.q) if total is None else {n: total[n] + q for n, q in task_vector.q.items()}
    assert all(torch.equal(loaded.sum[n], total[n]) for n in total)


class CrashOn(TrainerCallback):
    def __init__(self, task_id: str):
        self.task_id = task_id

    def on_step_end(self, args, state, control, **kwargs):
        if args.task_id == self.task_id and state.global_step == 2:
            raise RuntimeError("simulated crash")


def test_a_crash_loses_only_the_task_in_flight_and_a_restart_ends_with_the_same_bytes(tmp_path):
    data = task_dataset()
    train_tasks(tiny_model(), data, "task", sift_args(tmp_path / "runs"), tmp_path / "whole")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_tasks(
            tiny_model(), data, "task", sift_args(tmp_path / "runs"), tmp_path / "cut", callbacks=[CrashOn("t1")]
        )
    assert MergedDelta.from_pretrained(tmp_path / "cut").task_ids == ["t0"]  # valid after every task
    restarted = train_tasks(tiny_model(), data, "task", sift_args(tmp_path / "runs"), tmp_path / "cut")
    assert restarted.task_ids == ["t0", "t1", "t2"]
    assert folder_bytes(tmp_path / "cut") == folder_bytes(tmp_path / "whole")
    with pytest.raises(ValueError):  # another sign seed cannot continue this artifact
        train_tasks(tiny_model(), data, "task", sift_args(tmp_path / "runs", sign_seed=8), tmp_path / "cut")


def test_peft_tasks_share_the_adapter_initialisation(tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    data = task_dataset(num_tasks=2)
    delta = train_tasks(tiny_model(), data, "task", sift_args(tmp_path / "runs"), tmp_path / "m", peft_config=lora)
    assert delta.names and all("lora_" in n for n in delta.names)
    again = train_tasks(tiny_model(), data, "task", sift_args(tmp_path / "runs"), tmp_path / "m2", peft_config=lora)
    assert again.base_digest == delta.base_digest and again.digest == delta.digest
    # The base model digest is of the model before the adapter wraps it (names without peft's prefixes).
    assert delta.base_model_digest == state_dict_digest(tiny_model().state_dict())
    assert MergedDelta.from_pretrained(tmp_path / "m").base_model_digest == delta.base_model_digest
    # Format 2: P is the merged adapter as a peft checkpoint, written from the wrapped model at θ0.
    from peft import PeftModel

    from hf_sift.artifact import read_config
    from hf_sift.trainer.multi_task import prepare_base

    assert read_config(tmp_path / "m").format_version == 2
    _, constraint, _ = prepare_base(tiny_model(), sift_args(tmp_path / "runs"), peft_config=lora)
    served = delta.materialize(constraint.reference_state_dict(), None)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "m").state_dict()
    assert all(torch.equal(loaded[n], served[n]) for n in delta.names)


def _rank_main(rank: int, world_size: int, port: int, runs: str, output: str) -> None:
    set_distributed_env(rank, world_size, port)
    try:
        result = train_tasks(tiny_model(), task_dataset(num_tasks=3), "task", sift_args(runs), output)
        assert (result is not None) == (rank == 0)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_two_processes_give_the_same_bytes_as_one(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU kernels must see the same thread count in both layouts
    try:
        train_tasks(tiny_model(), task_dataset(num_tasks=3), "task", sift_args(tmp_path / "runs"), tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path / "runs2"), str(tmp_path / "two")), nprocs=2, join=True)
    assert folder_bytes(tmp_path / "two") == folder_bytes(tmp_path / "one")
    assert not [p for p in tmp_path.iterdir() if ".rank" in p.name]  # partial artifacts are cleaned up


class Tokenizer:
    """Stands for a tokenizer: saved files decide its identity."""

    def __init__(self, vocabulary: str):
        self.vocabulary = vocabulary

    def save_pretrained(self, folder):
        (Path(folder) / "vocab.txt").write_text(self.vocabulary)


def test_rows_grouped_by_task_keep_their_digest_when_other_tasks_rows_come_and_go(tmp_path):
    """Data grouped by task, as data often is: the rows of the first task are a slice of the dataset's buffers.
    Appending a new task's rows (to train it) or deleting an unlearned task's rows changes nothing recorded."""
    data = task_dataset(num_tasks=3).sort("task").flatten_indices()
    args = sift_args(tmp_path / "runs")
    before_t2 = data.filter(lambda row: row["task"] != "t2")
    train_tasks(tiny_model(), before_t2, "task", args, tmp_path / "grown")
    grown = train_tasks(tiny_model(), data, "task", args, tmp_path / "grown")  # t2's rows appended: resumed
    assert grown.task_ids == ["t0", "t1", "t2"]
    train_tasks(tiny_model(), data, "task", args, tmp_path / "whole")
    assert folder_bytes(tmp_path / "grown") == folder_bytes(tmp_path / "whole")
    # Unlearn t1, delete its rows, then unlearn t0 by replaying it on what is left.
    unlearn(tmp_path / "grown", ["t1"], model=tiny_model(), dataset=data)
    without_t1 = data.filter(lambda row: row["task"] != "t1")
    report = unlearn(tmp_path / "grown", ["t0"], model=tiny_model(), dataset=without_t1)
    assert [t.source for t in report.tasks] == ["replay"]
    train_tasks(tiny_model(), data, "task", args, tmp_path / "t2-only", tasks=["t2"])
    assert (
        MergedDelta.from_pretrained(tmp_path / "grown").digest
        == MergedDelta.from_pretrained(tmp_path / "t2-only").digest
    )


@pytest.mark.parametrize(
    "change, words",
    [
        ("learning_rate", "learning_rate: recorded 0.01, now 0.02"),
        ("data", "rows of 't0'"),
        ("tokenizer", "processing_class.hash"),
    ],
)
def test_a_resume_with_another_recipe_is_refused_unless_allowed(tmp_path, change, words):
    data = task_dataset(num_tasks=3)
    args, tokenizer = sift_args(tmp_path / "runs"), Tokenizer("a b c")
    train_tasks(tiny_model(), data, "task", args, tmp_path / "m", tasks=["t0"], processing_class=tokenizer)
    before = folder_bytes(tmp_path / "m")
    before_rows = MergedDelta.from_pretrained(tmp_path / "m").record("t0")["metadata"]["recipe"]["rows"]
    if change == "learning_rate":
        args = sift_args(tmp_path / "runs", learning_rate=0.02)
    elif change == "data":
        first = data["task"].index("t0")
        data = data.map(lambda r, i: {"labels": r["labels"][::-1]} if i == first else {}, with_indices=True)
    else:
        tokenizer = Tokenizer("a b d")
    with pytest.raises(MixedRecipeError, match=f"task 't0' .*{words}"):
        train_tasks(tiny_model(), data, "task", args, tmp_path / "m", processing_class=tokenizer)
    assert folder_bytes(tmp_path / "m") == before
    delta = train_tasks(
        tiny_model(), data, "task", args, tmp_path / "m", processing_class=tokenizer, allow_mixed_recipes=True
    )
    first, second = (delta.record(t)["metadata"]["recipe"] for t in ("t0", "t1"))  # each keeps its own recipe
    if change == "learning_rate":
        assert (first["training_arguments"]["learning_rate"], second["training_arguments"]["learning_rate"]) == (
            0.01,
            0.02,
        )
    elif change == "data":
        assert first["rows"] == before_rows and first["rows"]["digest"] != rows_digest(
            data.select([i for i, t in enumerate(data["task"]) if t == "t0"])
        )
    else:
        assert first["processing_class"] != second["processing_class"]


def test_task_vectors_reach_the_caller_and_the_store(tmp_path):
    seen = {}
    delta = train_tasks(
        tiny_model(),
        task_dataset(num_tasks=2),
        "task",
        sift_args(tmp_path / "runs"),
        tmp_path / "m",
        task_vector_store=tmp_path / "store",
        on_task_vector=seen.__setitem__,
    )
    store = TaskVectorStore(tmp_path / "store")
    assert sorted(seen) == store.task_ids == delta.task_ids
    for task_id, task_vector in seen.items():
        assert task_vector.digest == delta.record(task_id)["digest"]
        stored = store.get(task_id, expected_digest=task_vector.digest)
        assert all(torch.equal(stored.q[n], task_vector.q[n]) for n in task_vector.q)


def test_the_record_keeps_the_seed_the_user_gave(tmp_path):
    delta = train_tasks(
        tiny_model(), task_dataset(num_tasks=1), "task", sift_args(tmp_path / "runs", seed=5), tmp_path / "m"
    )
    recipe = Recipe.from_dict(delta.record("t0")["metadata"]["recipe"])
    assert recipe.training_arguments["seed"] == 5
    assert recipe.build_args(tmp_path / "x").for_task("t0").task_seed == recipe.task_seed == derive_seed(5, "t0")

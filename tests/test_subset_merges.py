"""Subset merges built from stored task vectors equal `train_tasks` on the subset, byte for byte (issue 17)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from trainer_fixtures import sift_args, task_dataset, tiny_model

from hf_sift import TaskVectorStore, train_tasks
from hf_sift.errors import TaskDigestMismatchError


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "subset_merges.py"


def load_example():
    spec = importlib.util.spec_from_file_location("subset_merges", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_subset_merges_from_the_store_equal_train_tasks_on_the_subset(tmp_path):
    example = load_example()
    dataset = task_dataset(num_tasks=4, rows_per_task=4)
    args = sift_args(tmp_path / "runs", max_steps=2)
    full = train_tasks(
        tiny_model(), dataset, args=args, output_dir=tmp_path / "all", task_vector_store=tmp_path / "tv"
    )
    store = TaskVectorStore(tmp_path / "tv")
    assert store.task_ids == full.task_ids == ["t0", "t1", "t2", "t3"]
    for task_id in full.task_ids:
        assert store.get(task_id).digest == full.record(task_id)["digest"]

    for subset in (["t0", "t1"], ["t1", "t3"], ["t0", "t1", "t2", "t3"]):
        name = "-".join(subset)
        merge = example.subset_merge(tmp_path / "all", store, subset)
        merge.save_pretrained(tmp_path / f"stored-{name}")
        if len(subset) == 4:
            expected = tmp_path / "all"
        else:
            expected = tmp_path / f"trained-{name}"
            train_tasks(tiny_model(), dataset, args=args, output_dir=expected, tasks=subset)
        assert merge.task_ids == subset
        assert folder_bytes(tmp_path / f"stored-{name}") == folder_bytes(expected), subset


def test_a_stored_vector_that_is_not_the_merged_one_is_refused(tmp_path):
    example = load_example()
    dataset = task_dataset(num_tasks=1, rows_per_task=4)
    train_tasks(tiny_model(), dataset, args=sift_args(tmp_path / "runs", max_steps=2), output_dir=tmp_path / "a")
    other = train_tasks(
        tiny_model(),
        dataset,
        args=sift_args(tmp_path / "runs", max_steps=1),
        output_dir=tmp_path / "b",
        task_vector_store=tmp_path / "tv",
    )
    before = folder_bytes(tmp_path / "a")
    with pytest.raises(TaskDigestMismatchError, match="not the expected"):
        example.subset_merge(tmp_path / "a", TaskVectorStore(tmp_path / "tv"), [])
    assert folder_bytes(tmp_path / "a") == before and other.task_ids == ["t0"]

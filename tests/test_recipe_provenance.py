"""Recipe version 2 hashes content only; recipes recorded at version 1 are still compared, and replayed, the v1 way."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli_fixtures import tiny_tokenizer
from datasets import Dataset, List, Value
from huggingface_hub import HfApi
from trainer_fixtures import sift_args, task_dataset, tiny_model
from transformers import AutoTokenizer, DataCollatorForLanguageModeling

from hf_sift import MergedDelta, unlearn
from hf_sift.errors import MixedRecipeError, ReplayPreconditionError
from hf_sift.trainer import train_tasks
from hf_sift.trainer.recipe import PROVENANCE_FIELDS, RECIPE_VERSION, Recipe, object_identity, rows_digest
from hf_sift.unlearning_log import LOG_NAME


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer().save_pretrained(folder)
    return folder


def load(folder: Path, **kwargs):
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **kwargs)


def identities(tokenizer, version: int) -> tuple[dict, dict]:
    """The identity of `tokenizer`, and of a collator holding it (hashed through the tokenizer's own identity)."""
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return object_identity(tokenizer, version=version), object_identity(collator, version=version)


def test_the_version_is_3_and_the_provenance_fields_are_the_load_time_flags():
    assert RECIPE_VERSION == 3
    assert {"is_local", "local_files_only"} <= PROVENANCE_FIELDS
    assert not {"padding_side", "model_max_length", "pad_token", "added_tokens_decoder"} & PROVENANCE_FIELDS


def test_one_tokenizer_loaded_three_ways_has_one_identity(tokenizer_folder, local_hub, tmp_path):
    api = HfApi()
    api.create_repo("me/provenance-tokenizer", exist_ok=True)
    api.upload_folder(folder_path=tokenizer_folder, repo_id="me/provenance-tokenizer")
    folder = load(tokenizer_folder)  # as `hf-sift train --model FOLDER` loads it: `"is_local": true`
    offline = load(tokenizer_folder, local_files_only=True)  # `"local_files_only": true`
    hub = load("me/provenance-tokenizer", cache_dir=tmp_path / "cache")  # from the Hub cache: `"is_local": false`
    for other in (offline, hub):
        assert identities(other, 2) == identities(folder, 2)
        # Version 1 hashed the load-time flags: each pair differs, for the tokenizer and for the collator holding it.
        v1, v1_collator = identities(other, 1)
        assert v1 != identities(folder, 1)[0] and v1_collator != identities(folder, 1)[1]
    assert object_identity(folder) == object_identity(folder, version=RECIPE_VERSION)


@pytest.mark.parametrize("change", ["added_token", "padding_side", "model_max_length", "pad_token"])
def test_a_content_change_changes_the_identity(tokenizer_folder, change):
    """Including a padding side set on a loaded tokenizer, which `save_pretrained` does not write."""
    tokenizer = load(tokenizer_folder)
    if change == "added_token":
        tokenizer.add_tokens(["w60x"])
    elif change == "padding_side":
        tokenizer.padding_side = "left"
    elif change == "model_max_length":
        tokenizer.model_max_length = 12
    else:
        tokenizer.pad_token = "[EOS]"
    same = load(tokenizer_folder, local_files_only=True)  # other load-time flags, the same content
    changed, changed_collator = identities(tokenizer, 2)
    assert changed != identities(same, 2)[0] and changed_collator != identities(same, 2)[1]


# The fixed rows and a plain collator, hashed by the version-1 code before version 2 existed: version 1 must keep
# giving these digests, or artifacts recorded then would no longer replay.
V1_ROWS = "sha256:1d61c8140551317574dd07e6444643c8e25050b35351d56ac49285f63a088aae"
V1_SECOND_ROW = "sha256:5fded8b00898ad823e28de5e56d85e261e5640d59361717c5a1124908e3612d0"
V1_PAD = "sha256:a4efda4da4dda9d40dc319c2c7e99de15ca39926e845d644cb77dad638401f05"


def fixed_rows() -> Dataset:
    return Dataset.from_dict(
        {"input_ids": [[1, 2, 3], [4, 5, 6]], "labels": [[1, 2, 3], [-100, 5, 6]], "task": ["a", "b"]}
    )


class Pad:
    def __init__(self):
        self.pad_to_multiple_of = 8
        self.label_pad = -100


def test_version_1_digests_are_the_ones_recorded_before():
    data = fixed_rows()
    assert rows_digest(data, version=1) == V1_ROWS
    assert rows_digest(data.select([1]), version=1) == V1_SECOND_ROW
    assert object_identity(Pad(), version=1)["hash"] == V1_PAD
    # Rows in buffers of their own hash alike at versions 2 and 3 (version 3 only copies them into such buffers).
    assert rows_digest(data) == rows_digest(data, version=3) == rows_digest(data, version=2) != V1_ROWS


def test_the_rows_digest_covers_rows_not_metadata():
    data = fixed_rows()
    # Equal rows through two different `map`s: their Arrow schemas carry different `datasets` fingerprints.
    mapped = data.map(lambda row: row)
    remapped = data.map(lambda row: {"task": row["task"]})
    metadata = [d.with_format("arrow")[:].schema.metadata for d in (data, mapped, remapped)]
    assert len({repr(m) for m in metadata}) == 3  # the schemas differ, by their metadata only
    assert rows_digest(data) == rows_digest(mapped) == rows_digest(remapped)
    assert len({rows_digest(d, version=1) for d in (data, mapped, remapped)}) == 3  # version 1 hashed it
    # One value, the order, or a column's Arrow type still changes it.
    changed = Dataset.from_dict({**data.to_dict(), "labels": [[1, 2, 3], [-100, 5, 7]]})
    assert rows_digest(changed) != rows_digest(data)
    assert rows_digest(data.select([1, 0])) != rows_digest(data)
    wider = data.cast_column("input_ids", List(Value("int64")))
    assert wider["input_ids"] == data["input_ids"] and rows_digest(wider) != rows_digest(data)


def test_the_rows_digest_does_not_depend_on_the_rows_around_them():
    """A task's rows at the start of a dataset grouped by task are a slice whose Arrow buffers run on into the next
    tasks' rows; version 2 hashed those too, so appending or deleting another task's rows changed the digest."""
    rows = {
        "task": ["a", "a", "b", "c", "c"],
        "input_ids": [[1, 2], [3], [4, 5, 6], [7], [8, 9]],
        "nested": [[[1], [2, 3]], [[4]], [[5]], [[6, 7]], [[]]],
        "maybe": [1, 2, None, 4, 5],  # a validity bitmap in the whole column, none in the rows of "a" alone
        "text": ["x", "yy", "zzz", "", "w"],
    }

    def alone(task: str) -> Dataset:
        return Dataset.from_dict({k: [v for v, t in zip(vs, rows["task"]) if t == task] for k, vs in rows.items()})

    def of(data: Dataset, task: str) -> Dataset:
        return data.select([i for i, t in enumerate(data["task"]) if t == task])

    data = Dataset.from_dict(rows)
    for task in ("a", "c"):
        layouts = [
            alone(task),
            of(data, task),
            of(data.filter(lambda row: row["task"] != "b"), task),  # another task's rows deleted
            of(data.map(lambda row: row), task),
            of(data.select([2, 3, 4, 0, 1] if task == "a" else [3, 4, 0, 1, 2]).flatten_indices(), task),  # moved
        ]
        assert len({rows_digest(d) for d in layouts}) == 1, task
    # Version 2 saw the difference (tasks recorded then are still compared as they were recorded).
    assert rows_digest(of(data, "a"), version=2) != rows_digest(alone("a"), version=2)
    # One value or the order of the rows still changes it.
    assert rows_digest(of(data, "c")) != rows_digest(of(data, "c").select([1, 0]))


def test_a_recipe_of_another_version_is_not_compared_by_hash(tmp_path):
    args = sift_args(tmp_path)
    recorded = Recipe.capture(args, "a", fixed_rows(), version=1)
    assert recorded.version == 1 and recorded.rows["digest"] == V1_ROWS
    assert recorded.differences(Recipe.capture(args, "a", fixed_rows(), version=1)) == []
    with pytest.raises(ValueError, match="capture the run's recipe with version=1"):
        recorded.differences(Recipe.capture(args, "a", fixed_rows()))
    for version in (0, RECIPE_VERSION + 1):
        with pytest.raises(ReplayPreconditionError, match="recipe version"):
            Recipe.capture(args, "a", fixed_rows(), version=version)
    with pytest.raises(ReplayPreconditionError, match="newer than this hf_sift reads"):
        Recipe.from_dict({**recorded.to_dict(), "version": RECIPE_VERSION + 1})


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOG_NAME
    }


def test_an_artifact_recorded_at_version_1_is_continued_and_replayed(tokenizer_folder, tmp_path, monkeypatch):
    """Tasks recorded by version 1 (hashes with the load-time flags and the schema metadata) are continued by a
    version-2 run and unlearned by replay, each compared at its own version; the result is a fresh merge's bytes."""
    data = task_dataset(num_tasks=3, rows_per_task=4)
    args = sift_args(tmp_path / "runs", max_steps=2)

    def train(folder: Path, tasks: list[str], **kwargs) -> None:
        tokenizer = load(tokenizer_folder)  # a fresh load each time, as a later run would
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        train_tasks(
            tiny_model(), data, "task", args, folder, tasks=tasks, processing_class=tokenizer, data_collator=collator,
            **kwargs,
        )  # fmt: skip

    with monkeypatch.context() as old:
        old.setattr("hf_sift.trainer.recipe_hashes.RECIPE_VERSION", 1)
        train(tmp_path / "artifact", ["t0", "t1"])
        train(tmp_path / "fresh", ["t0"])
    delta = MergedDelta.from_pretrained(tmp_path / "artifact")
    recorded = Recipe.from_dict(delta.record("t1")["metadata"]["recipe"])
    t1_rows = data.select([i for i, t in enumerate(data["task"]) if t == "t1"])
    assert recorded.version == 1 and recorded.rows["digest"] == rows_digest(t1_rows, version=1)
    assert recorded.processing_class == object_identity(load(tokenizer_folder), version=1)

    train(tmp_path / "artifact", ["t2"])  # continues: the version-1 tasks are checked as version 1
    delta = MergedDelta.from_pretrained(tmp_path / "artifact")
    assert [delta.record(t)["metadata"]["recipe"]["version"] for t in ("t0", "t1", "t2")] == [1, 1, RECIPE_VERSION]
    with pytest.raises(MixedRecipeError, match="t0"):  # and still refused where they differ
        train_tasks(tiny_model(), data, "task", sift_args(tmp_path / "runs", max_steps=3), tmp_path / "artifact")

    # A tokenizer loaded another way has the identity version 1 recorded differently: refused for the v1 task.
    shutil.copytree(tmp_path / "artifact", tmp_path / "copy")
    offline = load(tokenizer_folder, local_files_only=True)
    collator = DataCollatorForLanguageModeling(offline, mlm=False)
    with pytest.raises(ReplayPreconditionError, match="task 't1' cannot be replayed as recorded: .*processing_class"):
        unlearn(tmp_path / "copy", ["t1"], model=tiny_model(), dataset=data, processing_class=offline, data_collator=collator)  # fmt: skip
    assert folder_bytes(tmp_path / "copy") == folder_bytes(tmp_path / "artifact")

    tokenizer = load(tokenizer_folder)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    report = unlearn(
        tmp_path / "artifact", ["t1", "t2"], model=tiny_model(), dataset=data, processing_class=tokenizer,
        data_collator=collator,
    )  # fmt: skip
    assert [t.source for t in report.tasks] == ["replay", "replay"]
    assert folder_bytes(tmp_path / "artifact") == folder_bytes(tmp_path / "fresh")
    assert MergedDelta.from_pretrained(tmp_path / "artifact").digest == report.digest_after

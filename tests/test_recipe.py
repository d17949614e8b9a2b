"""The recipe: complete, versioned, rebuilds the training arguments exactly, and names what differs."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling

from hf_sift.errors import ReplayPreconditionError
from hf_sift.trainer import SIFTConfig
from hf_sift.trainer.recipe import (
    RECIPE_VERSION,
    Recipe,
    environment_differences,
    object_identity,
    probe_environment,
    rows_digest,
    training_arguments,
)
from hf_sift.trainer.sift_config import derive_seed


def config(tmp_path, **overrides) -> SIFTConfig:
    kwargs = dict(output_dir=str(tmp_path / "runs"), report_to="none", use_cpu=True, sign_seed=3, seed=11)
    kwargs.update(overrides)
    return SIFTConfig(**kwargs)


def rows(n: int = 4) -> Dataset:
    return Dataset.from_dict({"input_ids": [[i, i + 1] for i in range(n)], "task": ["a"] * n})


# Arguments the first recipe missed, all of which change training (issue 13).
CHANGED = dict(
    learning_rate=3e-4,
    lr_scheduler_type="cosine_with_restarts",
    lr_scheduler_kwargs={"num_cycles": 2},
    optim="adamw_torch",
    optim_args="foreach=False",
    label_smoothing_factor=0.1,
    dataloader_drop_last=True,
    gradient_checkpointing=True,
    neftune_noise_alpha=5.0,
    average_tokens_across_devices=False,
    data_seed=9,
    gradient_accumulation_steps=2,
    include_parameters=["q_proj"],
)


def test_the_recipe_rebuilds_the_training_arguments_exactly(tmp_path):
    args = config(tmp_path, **CHANGED)
    recipe = Recipe.capture(args, "alice", rows(), environment=probe_environment())
    stored = json.loads(json.dumps(recipe.to_dict()))  # as the manifest keeps it
    again = Recipe.from_dict(stored)
    assert again == recipe and again.version == RECIPE_VERSION
    rebuilt = again.build_args(tmp_path / "replay")
    assert training_arguments(rebuilt) == recipe.training_arguments
    for name in CHANGED:
        assert getattr(rebuilt, name) == getattr(args, name), name
    assert rebuilt.seed == 11 and recipe.task_seed == derive_seed(11, "alice") == rebuilt.for_task("alice").task_seed
    assert rebuilt.output_dir == str(tmp_path / "replay")


def test_paths_logging_and_reporting_are_not_recorded(tmp_path):
    recorded = training_arguments(config(tmp_path, logging_steps=7, report_to="none", hub_model_id="x/y"))
    assert not {"output_dir", "logging_steps", "report_to", "hub_model_id", "task_id", "save_strategy"} & set(recorded)
    assert {"learning_rate", "seed", "sign_seed", "label_smoothing_factor", "neftune_noise_alpha"} <= set(recorded)


def test_differences_name_the_field_and_both_values(tmp_path):
    recorded = Recipe.capture(config(tmp_path, learning_rate=1e-4), "a", rows())
    now = Recipe.capture(config(tmp_path, learning_rate=2e-4), "a", rows(5))
    problems = recorded.differences(now)
    assert "learning_rate: recorded 0.0001, now 0.0002" in problems
    assert any(p.startswith("rows of task 'a': recorded 4 rows") for p in problems)
    assert recorded.differences(Recipe.capture(config(tmp_path, learning_rate=1e-4), "a", rows())) == []


def test_the_rows_digest_is_content_and_order(tmp_path):
    data = rows()
    assert rows_digest(data) == rows_digest(rows())  # a rebuilt dataset with the same rows
    assert rows_digest(data.select([1, 0, 2, 3])) != rows_digest(data)
    changed = Dataset.from_dict({"input_ids": [[0, 1], [1, 2], [2, 9], [3, 4]], "task": ["a"] * 4})
    assert rows_digest(changed) != rows_digest(data)


def test_collator_and_tokenizer_identity(tmp_path):
    class Vocab:
        def __init__(self, words):
            self.words = words

        def save_pretrained(self, folder):
            with open(f"{folder}/vocab.txt", "w") as f:
                f.write(self.words)

    assert object_identity(Vocab("a b")) == object_identity(Vocab("a b")) != object_identity(Vocab("a c"))
    assert object_identity(None) is None
    one = DataCollatorForLanguageModeling(Vocab("a b"), mlm=False)
    assert object_identity(one) == object_identity(DataCollatorForLanguageModeling(Vocab("a b"), mlm=False))
    assert object_identity(one) != object_identity(DataCollatorForLanguageModeling(Vocab("a c"), mlm=False))
    assert object_identity(one) != object_identity(DataCollatorForLanguageModeling(Vocab("a b"), mlm=False, seed=1))


def test_environment_differences_name_the_machine():
    here = probe_environment("cpu")
    assert environment_differences(here, probe_environment("cpu")) == []
    there = json.loads(json.dumps(here))
    there["cpu"].update(threads=2, model="AMD EPYC 7B13", instruction_set="AVX2")
    there["versions"]["torch"] = "0.0.1"
    problems = environment_differences(there, here)
    assert problems[0].startswith("machine: recorded 2 threads on AMD EPYC 7B13 (AVX2), now ")
    assert "versions.torch: recorded '0.0.1', now " + repr(here["versions"]["torch"]) in problems
    there = json.loads(json.dumps(here))
    there["determinism"]["deterministic_algorithms"] = not here["determinism"]["deterministic_algorithms"]
    assert environment_differences(there, here) == []  # set again by the replay's own full_determinism


def test_a_recipe_that_cannot_be_read_or_rebuilt_is_refused(tmp_path):
    recipe = Recipe.capture(config(tmp_path), "a", rows()).to_dict()
    with pytest.raises(ReplayPreconditionError, match="no recipe"):
        Recipe.from_dict(None)
    with pytest.raises(ReplayPreconditionError, match="newer"):
        Recipe.from_dict({**recipe, "version": RECIPE_VERSION + 1})
    with pytest.raises(ReplayPreconditionError, match="no longer build"):
        Recipe.from_dict({**recipe, "training_arguments": {**recipe["training_arguments"], "no_such_field": 1}}).build_args(tmp_path)  # fmt: skip
    with pytest.raises(ReplayPreconditionError, match="does not derive"):
        Recipe.from_dict({**recipe, "task_seed": recipe["task_seed"] + 1}).build_args(tmp_path)


def test_a_tokenizer_keeps_its_identity_after_being_called():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def tokenizer(words):
        backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}, "[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")

    used, fresh = tokenizer(["a", "b"]), tokenizer(["a", "b"])
    used("a b", max_length=4, truncation=True, padding="max_length")  # fast tokenizers keep this state
    assert object_identity(used) == object_identity(fresh) != object_identity(tokenizer(["a", "c"]))

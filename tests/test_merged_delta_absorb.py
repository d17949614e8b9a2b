"""MergedDelta.absorb: joining tasks whose task vectors were summed elsewhere (the all-reduce of train_tasks)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import perturbed

from hf_sift import MergedDelta, TaskVector
from hf_sift.compatibility import Compatibility, check_compatible
from hf_sift.errors import (
    BaseModelMismatchError,
    DuplicateTaskError,
    ParameterMismatchError,
    SignSeedMismatchError,
)


def test_absorb_equals_adding_one_by_one(tiny_llama_state, tiny_llama_dir, tmp_path):
    vectors = {
        f"t{i}": TaskVector.from_state_dicts(tiny_llama_state, perturbed(tiny_llama_state, i), 3) for i in range(3)
    }
    one_by_one = MergedDelta(tiny_llama_state, 3, base_model=str(tiny_llama_dir))
    for task_id, vector in vectors.items():
        one_by_one.add(task_id, vector)
    one_by_one.save_pretrained(tmp_path / "a")

    joined = MergedDelta(tiny_llama_state, 3, base_model=str(tiny_llama_dir))
    joined.add("t0", vectors["t0"])
    elsewhere = {n: vectors["t1"].q[n] + vectors["t2"].q[n] for n in vectors["t1"].q}
    records = {t: one_by_one.record(t) for t in ("t1", "t2")}
    masks = {t: vectors[t].packed_masks for t in ("t1", "t2")}
    joined.absorb(elsewhere, records, masks, source=one_by_one)
    joined.save_pretrained(tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert Path("model.safetensors") in files  # format 2: the plain merge P too
    for path in files:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes(), path

    digest = joined.digest
    with pytest.raises(DuplicateTaskError):
        joined.absorb(elsewhere, records, masks, source=one_by_one)
    bad = {**elsewhere, next(iter(elsewhere)): elsewhere[next(iter(elsewhere))].to(torch.int32)}
    fresh = {"t9": records["t1"]}
    with pytest.raises(ParameterMismatchError):
        joined.absorb(bad, fresh, {"t9": masks["t1"]}, source=one_by_one)
    with pytest.raises(ParameterMismatchError):
        joined.absorb(elsewhere, fresh, {}, source=one_by_one)
    assert joined.digest == digest and joined.task_ids == ["t0", "t1", "t2"]


def _other_merges(state):
    """Merges that must not be joined with `MergedDelta(state, 3)`, each with the error `add` raises for them."""
    other_base = perturbed(state, 99)
    fewer = [n for n in MergedDelta(state, 3).names if "layers.1." not in n]
    fp16 = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return {
        "sign seed": (MergedDelta(state, 4), TaskVector.from_state_dicts(state, other_base, 4), SignSeedMismatchError),
        "scale bits": (
            MergedDelta(state, 3, scale_bits=30),
            TaskVector.from_state_dicts(state, other_base, 3, scale_bits=30),
            SignSeedMismatchError,
        ),
        "base": (
            MergedDelta(other_base, 3),
            TaskVector.from_state_dicts(other_base, state, 3),
            BaseModelMismatchError,
        ),
        "parameters": (
            MergedDelta(state, 3, fewer),
            TaskVector.from_state_dicts(state, other_base, 3, fewer),
            ParameterMismatchError,
        ),
        "dtypes": (MergedDelta(fp16, 3), None, ParameterMismatchError),
    }


def test_absorb_refuses_what_add_refuses_with_the_same_error(tiny_llama_state, tmp_path):
    vector = TaskVector.from_state_dicts(tiny_llama_state, perturbed(tiny_llama_state, 1), 3)
    for what, (other, other_vector, error) in _other_merges(tiny_llama_state).items():
        merge = MergedDelta(tiny_llama_state, 3)
        merge.add("t0", vector)
        digest = merge.digest
        if other_vector is not None:
            with pytest.raises(error):
                merge.add("t1", other_vector)
            other.add("t1", other_vector)
        records = {t: other.record(t) for t in other.task_ids}
        masks = {t: other.load_mask(t) for t in other.task_ids}
        with pytest.raises(error):
            merge.absorb(other.sum, records, masks, source=other)
        with pytest.raises(error):  # through a Compatibility, as processes exchange it
            merge.absorb(other.sum, records, masks, source=Compatibility.of(other))
        other.save_pretrained(tmp_path / what, base=None)  # what a resume loads (a merge on another base: no P)
        with pytest.raises(error):
            check_compatible(merge, MergedDelta.from_pretrained(tmp_path / what), "the artifact to resume")
        assert merge.digest == digest and merge.task_ids == ["t0"], what


def test_the_whole_base_model_is_compared_when_both_sides_know_it(tiny_llama_state):
    merge = Compatibility.of(MergedDelta(tiny_llama_state, 3))
    same = Compatibility(merge.sign_seed, merge.scale_bits, merge.base_digest, merge.shapes, merge.dtypes)
    known = dataclasses.replace(same, base_model_digest="sha256:" + "a" * 64)
    other = dataclasses.replace(same, base_model_digest="sha256:" + "b" * 64)
    check_compatible(merge, known)  # unknown on one side: not compared
    check_compatible(known, dataclasses.replace(known))
    with pytest.raises(BaseModelMismatchError, match="another base model"):
        check_compatible(known, other, "the artifact to resume")

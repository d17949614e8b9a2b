"""MergedDelta.absorb: joining tasks whose task vectors were summed elsewhere (the all-reduce of train_tasks)."""

from __future__ import annotations

import pytest
import torch
from conftest import perturbed

from hf_sift import MergedDelta, TaskVector
from hf_sift.errors import DuplicateTaskError, ParameterMismatchError


def test_absorb_equals_adding_one_by_one(tiny_llama_state, tmp_path):
    vectors = {
        f"t{i}": TaskVector.from_state_dicts(tiny_llama_state, perturbed(tiny_llama_state, i), 3) for i in range(3)
    }
    one_by_one = MergedDelta(tiny_llama_state, 3)
    for task_id, vector in vectors.items():
        one_by_one.add(task_id, vector)
    one_by_one.save_pretrained(tmp_path / "a")

    joined = MergedDelta(tiny_llama_state, 3)
    joined.add("t0", vectors["t0"])
    elsewhere = {n: vectors["t1"].q[n] + vectors["t2"].q[n] for n in vectors["t1"].q}
    records = {t: one_by_one.record(t) for t in ("t1", "t2")}
    masks = {t: vectors[t].packed_masks for t in ("t1", "t2")}
    joined.absorb(elsewhere, records, masks)
    joined.save_pretrained(tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    for path in files:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes(), path

    digest = joined.digest
    with pytest.raises(DuplicateTaskError):
        joined.absorb(elsewhere, records, masks)
    bad = {**elsewhere, next(iter(elsewhere)): elsewhere[next(iter(elsewhere))].to(torch.int32)}
    fresh = {"t9": records["t1"]}
    with pytest.raises(ParameterMismatchError):
        joined.absorb(bad, fresh, {"t9": masks["t1"]})
    with pytest.raises(ParameterMismatchError):
        joined.absorb(elsewhere, fresh, {})
    assert joined.digest == digest and joined.task_ids == ["t0", "t1", "t2"]

import pytest
import torch
from conftest import perturbed

from hf_sift import ParameterSelection, SignVector, TaskVector
from hf_sift.errors import AccumulatorOverflowError, ParameterMismatchError
from hf_sift.fixed_point import SCALE_BITS
from hf_sift.masks import unpack_bits


def test_integer_form_mask_and_digest(tiny_llama_state):
    tuned = perturbed(tiny_llama_state, seed=1)
    tv = TaskVector.from_state_dicts(tiny_llama_state, tuned, sign_seed=3)
    assert "model.embed_tokens.weight" not in tv.q and "lm_head.weight" not in tv.q
    assert "model.layers.0.mlp.up_proj.weight" in tv.q
    v = SignVector(3)
    for name, q in tv.q.items():
        expected = torch.round((tuned[name].double() - tiny_llama_state[name].double()) * 2.0**SCALE_BITS).to(
            torch.int64
        )
        assert torch.equal(q, expected)
        mask = unpack_bits(tv.mask[name], q.numel(), q.shape)
        assert torch.equal(mask, v.for_parameter(name, q.shape).to(torch.int64) * q > 0)
    assert 0.4 < tv.density < 0.6  # random updates agree with v about half the time
    assert tv.digest == TaskVector.from_state_dicts(tiny_llama_state, tuned, sign_seed=3).digest
    assert tv.digest != TaskVector.from_state_dicts(tiny_llama_state, perturbed(tiny_llama_state, 2), 3).digest


def test_selection_patterns(tiny_llama_state):
    tuned = perturbed(tiny_llama_state, seed=1)
    tv = TaskVector.from_state_dicts(
        tiny_llama_state, tuned, sign_seed=0, parameters=ParameterSelection(include=(r"mlp\.",))
    )
    assert tv.names and all(".mlp." in n for n in tv.names)
    explicit = TaskVector.from_state_dicts(tiny_llama_state, tuned, 0, parameters=["model.norm.weight"])
    assert explicit.names == ["model.norm.weight"]


def test_mismatched_state_dicts(tiny_llama_state):
    tuned = perturbed(tiny_llama_state, seed=1)
    tuned["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(ParameterMismatchError, match="shape"):
        TaskVector.from_state_dicts(tiny_llama_state, tuned, 0)
    del tuned["model.norm.weight"]
    with pytest.raises(ParameterMismatchError, match="lacks"):
        TaskVector.from_state_dicts(tiny_llama_state, tuned, 0)
    with pytest.raises(ParameterMismatchError):
        TaskVector.from_state_dicts(tiny_llama_state, tuned, 0, parameters=["no.such.weight"])


def test_overflow_and_nan_are_refused():
    base = {"w": torch.zeros(4, dtype=torch.float64)}
    with pytest.raises(AccumulatorOverflowError):
        TaskVector.from_state_dicts(base, {"w": torch.full((4,), 2.0**30, dtype=torch.float64)}, 0)
    with pytest.raises(AccumulatorOverflowError, match="finite"):
        TaskVector.from_state_dicts(base, {"w": torch.tensor([0.0, float("nan"), 0, 0], dtype=torch.float64)}, 0)

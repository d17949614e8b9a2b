"""Each merge method on a hand-computed example, and agreement with peft's merge functions."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from hf_sift.merging import (
    InvalidMergeParameterError,
    NegMergeAccumulator,
    UnknownMergeMethodError,
    available_methods,
    create_method,
    get_method,
    negmerge_task_vector,
    parse_params,
)
from hf_sift.merging.dare import tensor_seed


BASE = torch.ones(6)
TAU1 = torch.tensor([1.0, -2.0, 0.0, 4.0, 0.5, -1.5])
TAU2 = torch.tensor([3.0, 1.0, -1.25, -2.0, 0.5, 0.0])
TUNED = [BASE + TAU1, BASE + TAU2]


def merged(name: str, **params) -> torch.Tensor:
    method = create_method(name, **params)
    method.begin(["a", "b"])
    return method.merge_tensor("w", BASE, TUNED)


def test_task_arithmetic_hand_computed():
    assert torch.equal(
        merged("task_arithmetic", scaling=0.5).tensor, BASE + torch.tensor([2, -0.5, -0.625, 1, 0.5, -0.75])
    )
    weighted = merged("task_arithmetic", weights=(1.0, -1.0)).tensor
    assert torch.equal(weighted, BASE + TAU1 - TAU2)


def test_ties_hand_computed():
    # density 0.5 keeps 3 of 6: τ1 -> [0,-2,0,4,0,-1.5], τ2 -> [3,0,-1.25,-2,0,0]; elected signs [+,-,-,+,+,-].
    assert torch.equal(merged("ties", density=0.5).tensor, BASE + torch.tensor([3, -2, -1.25, 4, 0, -1.5]))


def test_magmax_hand_computed():
    # Largest |τ| per element; the tie at index 4 goes to the first model.
    assert torch.equal(merged("magmax").tensor, BASE + torch.tensor([3, -2, -1.25, 4, 0.5, -1.5]))
    assert torch.equal(merged("magmax", scaling=2.0).tensor, BASE + 2 * torch.tensor([3, -2, -1.25, 4, 0.5, -1.5]))


def test_soup_hand_computed():
    assert torch.equal(merged("soup").tensor, BASE + torch.tensor([2, -0.5, -0.625, 1, 0.5, -0.75]))


def test_tall_masks_hand_computed():
    total = TAU1 + TAU2
    result = merged("tall_masks", threshold=1.0)
    assert torch.equal(result.tensor, BASE + total)
    assert torch.equal(result.masks[0], torch.tensor([False, True, False, True, True, True]))
    assert torch.equal(result.masks[1], torch.tensor([True, False, True, False, True, False]))
    # Target density 0.5: the 3 largest ratios |τ_t| / |τ_MTL - τ_t| (x/0 = inf first).
    dense = merged("tall_masks", density=0.5, scaling=0.5)
    assert torch.equal(dense.tensor, BASE + 0.5 * total)
    assert torch.equal(dense.masks[0], torch.tensor([False, True, False, True, False, True]))
    assert torch.equal(dense.masks[1], torch.tensor([True, False, True, False, True, False]))


def test_emr_hand_computed():
    method = create_method("emr")
    method.begin(["a", "b"])
    result = method.merge_tensor("w", BASE, TUNED)
    assert torch.equal(result.tensor, BASE + torch.tensor([3, -2, -1.25, 4, 0.5, -1.5]))
    assert torch.equal(result.masks[0], torch.tensor([True, True, False, True, True, True]))
    assert torch.equal(result.masks[1], torch.tensor([True, False, True, False, True, False]))
    assert method.rescalers() == pytest.approx([9 / 11, 7.75 / 4.75], rel=1e-15)
    assert method.summary() == {"rescalers": {"a": method.rescalers()[0], "b": method.rescalers()[1]}}


def test_negmerge_hand_computed():
    # Signs agree strictly only at 0 and 4 (a zero at 2 and 5 breaks consensus).
    assert torch.equal(negmerge_task_vector([TAU1, TAU2]), torch.tensor([2, 0, 0, 0, 0.5, 0]))
    assert torch.equal(merged("negmerge", scaling=2.0).tensor, BASE - 2 * torch.tensor([2, 0, 0, 0, 0.5, 0]))


def test_negmerge_zeroes_exactly_the_disagreeing_entries():
    gen = torch.Generator().manual_seed(1)
    deltas = [torch.randn(64, 32, generator=gen) for _ in range(4)]
    deltas[2][torch.rand(64, 32, generator=gen) < 0.1] = 0.0
    signs = torch.stack([torch.sign(d) for d in deltas])
    agree = (signs == signs[0]).all(0) & (signs[0] != 0)
    assert 0 < int(agree.sum()) < agree.numel()
    result = negmerge_task_vector(deltas)
    assert torch.equal(result == 0, ~agree)
    expected = torch.stack(deltas).double().mean(0).float()
    assert torch.equal(result[agree], expected[agree])


def test_streaming_negmerge_equals_batch(tiny_llama_state):
    from conftest import perturbed

    candidates = [perturbed(tiny_llama_state, seed) for seed in range(5)]
    # force a few exact zeros in one candidate's task vector
    name = "model.layers.0.mlp.up_proj.weight"
    candidates[3][name] = candidates[3][name].clone()
    candidates[3][name][0] = tiny_llama_state[name][0]
    accumulator = NegMergeAccumulator(tiny_llama_state)
    for candidate in candidates:
        accumulator.add(candidate)
    streamed = accumulator.task_vector()
    assert set(streamed) == set(tiny_llama_state)
    for key, base in tiny_llama_state.items():
        batch = negmerge_task_vector([c[key] - base for c in candidates])
        assert torch.equal(streamed[key], batch), key
    assert torch.equal(streamed[name][0], torch.zeros_like(streamed[name][0]))
    assert 0 < accumulator.consensus_fraction() < 1


def test_task_arithmetic_and_ties_agree_with_peft():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(32, 16, generator=gen)
    tuned = [base + 0.1 * torch.randn(32, 16, generator=gen) for _ in range(3)]
    deltas = [t - base for t in tuned]
    weights = torch.tensor([0.5, 1.0, 2.0])
    ta = create_method("task_arithmetic", weights=(0.5, 1.0, 2.0)).merge_tensor("w", base, tuned).tensor
    assert torch.equal(ta, base + merge_utils.task_arithmetic(deltas, weights))
    for sign_method in ("total", "frequency"):
        method = create_method("ties", density=0.3, weights=(0.5, 1.0, 2.0), majority_sign_method=sign_method)
        expected = base + merge_utils.ties(deltas, weights, 0.3, majority_sign_method=sign_method)
        assert torch.equal(method.merge_tensor("w", base, tuned).tensor, expected)


@pytest.mark.parametrize("variant", ["linear", "ties"])
def test_dare_agrees_with_peft_and_is_reproducible(variant):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(64, 16, generator=gen)
    tuned = [base + 0.1 * torch.randn(64, 16, generator=gen) for _ in range(3)]
    deltas = [t - base for t in tuned]
    method = create_method("dare", density=0.25, variant=variant, seed=7)
    state = torch.random.get_rng_state()
    out = method.merge_tensor("layer.w", base, tuned).tensor
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG must be left untouched"
    torch.manual_seed(tensor_seed(7, "layer.w"))
    peft_fn = merge_utils.dare_linear if variant == "linear" else merge_utils.dare_ties
    assert torch.equal(out, base + peft_fn(deltas, torch.ones(3), 0.25))
    assert torch.equal(out, method.merge_tensor("layer.w", base, tuned).tensor)
    assert not torch.equal(out, method.merge_tensor("other.w", base, tuned).tensor)


def test_dare_single_model_keeps_or_rescales_each_entry():
    base = torch.zeros(4096)
    tau = torch.linspace(0.5, 1.5, 4096)
    out = create_method("dare", density=0.5, seed=1).merge_tensor("w", base, [tau]).tensor
    kept = out != 0
    assert torch.equal(out[kept], tau[kept] / 0.5)
    assert 0.45 < kept.float().mean().item() < 0.55


def test_sift_method_matches_merged_delta(tiny_llama_state):
    from conftest import perturbed

    from hf_sift import MergedDelta, TaskVector

    tuned = [perturbed(tiny_llama_state, seed) for seed in (10, 11, 12)]
    delta = MergedDelta(tiny_llama_state, sign_seed=5)
    vectors = [TaskVector.from_state_dicts(tiny_llama_state, t, sign_seed=5) for t in tuned]
    for i, vector in enumerate(vectors):
        delta.add(f"t{i}", vector)
    served = delta.materialize(tiny_llama_state)
    method = create_method("sift", sign_seed=5)
    for name in delta.names:
        result = method.merge_tensor(name, tiny_llama_state[name], [t[name] for t in tuned])
        assert torch.equal(result.tensor, served[name]), name
        for vector, mask in zip(vectors, result.masks):
            from hf_sift.masks import pack_bits

            assert torch.equal(pack_bits(mask), vector.packed_masks[name])


def test_registry_declarations():
    assert set(available_methods()) >= {
        "dare", "emr", "magmax", "negmerge", "sift", "soup", "tall_masks", "task_arithmetic", "ties",
    }  # fmt: skip
    cost = {name: get_method(name).removal_cost for name in available_methods()}
    assert cost["sift"] == cost["task_arithmetic"] == "1"
    assert cost["ties"] == cost["tall_masks"] == cost["emr"] == "all remaining"
    assert get_method("sift").supports_exact_removal and not get_method("ties").supports_exact_removal
    assert {n for n in available_methods() if get_method(n).localizes} == {"emr", "sift", "tall_masks"}
    with pytest.raises(UnknownMergeMethodError) as err:
        get_method("nope")
    assert isinstance(err.value, ValueError)


def test_typed_parameters():
    values = parse_params(get_method("ties"), ["density=0.5", "weights=1,0.5", "majority-sign-method=frequency"])
    assert values == {"density": 0.5, "weights": (1.0, 0.5), "majority_sign_method": "frequency"}
    assert parse_params(get_method("tall_masks"), ["density=none"]) == {"density": None}
    for bad in (["density=1.5"], ["density=x"], ["bogus=1"], ["majority_sign_method=mean"]):
        with pytest.raises(InvalidMergeParameterError):
            create_method("ties", **parse_params(get_method("ties"), bad))
    with pytest.raises(InvalidMergeParameterError):
        create_method("ties", bogus=1)
    with pytest.raises(InvalidMergeParameterError):
        create_method("task_arithmetic", weights=(1.0,)).merge_tensor("w", BASE, TUNED)


def test_sift_method_keeps_negative_zero_of_theta0_where_nothing_moved():
    # θ0 = -0.0 where no task moves (Q = 0): docs/FORMAT.md serves θ0's bits, the float sum θ0 + 0.0 gives +0.0.
    from hf_sift import MergedDelta, TaskVector

    base = torch.tensor([-0.0, -0.0, 1.5, -0.0])
    tuned = [torch.tensor([-0.0, 0.25, 1.5, -0.0]), torch.tensor([-0.0, -0.5, 1.0, -0.0])]
    method = create_method("sift", sign_seed=3)
    method.begin(["a", "b"])
    served = method.merge_tensor("w", base, tuned).tensor
    delta = MergedDelta({"w": base}, sign_seed=3)
    for task_id, tensor in zip(["a", "b"], tuned):
        delta.add(task_id, TaskVector.from_state_dicts({"w": base}, {"w": tensor}, sign_seed=3))
    expected = delta.materialize({"w": base})["w"]
    assert torch.equal(served.view(torch.int32), expected.view(torch.int32))
    assert served[0].view(torch.int32) == torch.tensor(-0.0).view(torch.int32)
    assert served[3].view(torch.int32) == torch.tensor(-0.0).view(torch.int32)

"""Format 2 for a peft adapter: P is the adapter's plain merge, a peft checkpoint `PeftModel.from_pretrained` loads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import perturbed, tiny_llama_config
from test_format_v2 import flip_in_tensor, tree_bytes
from transformers import LlamaForCausalLM

from hf_sift import MergedDelta, TaskVector
from hf_sift.artifact import CONFIG_NAME
from hf_sift.errors import BaseModelMismatchError, ParameterMismatchError
from hf_sift.verify import verify_artifact


IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


def lora_model(base_dir=None):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    if base_dir is not None:
        model.save_pretrained(base_dir)
    torch.manual_seed(1)
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
    )
    return get_peft_model(model, config)


def tuned_state(model) -> dict[str, torch.Tensor]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {n: t.detach().clone() for n, t in model.state_dict().items() if n in names}


def merge(theta0: dict[str, torch.Tensor], tasks: dict[str, int], base_model: str) -> MergedDelta:
    delta = MergedDelta(theta0, sign_seed=7, base_model=base_model)
    for task, seed in tasks.items():
        delta.add(task, TaskVector.from_state_dicts(theta0, perturbed(theta0, seed, scale=0.1), 7))
    return delta


@pytest.fixture
def peft_artifact(tmp_path):
    model = lora_model(tmp_path / "base")
    theta0 = tuned_state(model)
    delta = merge(theta0, {"t0": 100, "t1": 101, "t2": 102}, str(tmp_path / "base"))
    delta.save_pretrained(tmp_path / "artifact", base=model)
    return tmp_path / "artifact", tmp_path / "base", model, delta, theta0


def test_peft_plain_merge_loads_with_peft_and_equals_the_served_plain_merge(peft_artifact):
    from peft import PeftModel

    artifact, base_dir, model, delta, theta0 = peft_artifact
    assert json.loads((artifact / CONFIG_NAME).read_text())["format_version"] == 2
    assert (artifact / "adapter_config.json").is_file() and not (artifact / "model.safetensors").exists()
    assert not (artifact / "README.md").exists()  # peft's model card is not written into the user's folder
    expected = delta.materialize(theta0, None)
    assert any(not torch.equal(expected[n], theta0[n]) for n in delta.names)
    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), artifact)
    state = loaded.state_dict()
    for name in delta.names:
        assert torch.equal(state[name], expected[name]), name
    # The same logits as the model at θ0 given the served plain merge; and the effective (merged) weights equal.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in expected:
                param.copy_(expected[name])
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    merged = loaded.merge_and_unload().state_dict()
    reference = model.merge_and_unload().state_dict()
    assert set(merged) == set(reference) and all(torch.equal(merged[n], reference[n]) for n in merged)


def test_peft_plain_merge_after_add_and_remove_equals_a_fresh_merge(peft_artifact, tmp_path):
    artifact, base_dir, model, delta, theta0 = peft_artifact
    loaded = MergedDelta.from_pretrained(artifact)
    loaded.remove("t1", TaskVector.from_state_dicts(theta0, perturbed(theta0, 101, scale=0.1), 7))
    loaded.add("t9", TaskVector.from_state_dicts(theta0, perturbed(theta0, 109, scale=0.1), 7))
    loaded.save_pretrained(artifact, base=model)
    fresh = merge(theta0, {"t0": 100, "t2": 102, "t9": 109}, str(base_dir))
    fresh.save_pretrained(tmp_path / "fresh", base=model)
    got = tree_bytes(artifact)
    assert "adapter_model.safetensors" in got and got == tree_bytes(tmp_path / "fresh")


def test_peft_plain_merge_is_verified(peft_artifact):
    artifact, _, _, delta, _ = peft_artifact
    with pytest.warns(UserWarning, match="peft adapter"):
        assert verify_artifact(artifact) == []
    key = delta.names[0].replace(".default", "")
    flip_in_tensor(artifact / "adapter_model.safetensors", key)
    with pytest.warns(UserWarning, match="peft adapter"):
        problems = verify_artifact(artifact)
    assert problems == [f"adapter_model.safetensors: {delta.names[0]!r} does not match its digest in plain_digests"]


def test_a_peft_base_at_another_theta0_is_refused(peft_artifact, tmp_path):
    artifact, _, model, delta, _ = peft_artifact
    before = tree_bytes(artifact)
    with torch.no_grad():
        model.get_parameter(delta.names[0]).add_(1.0)
    with pytest.raises(BaseModelMismatchError, match="nothing was written"):
        delta.save_pretrained(artifact, base=model)
    assert tree_bytes(artifact) == before


def test_serving_a_peft_artifact_is_refused_with_the_recipe_that_serves_it(peft_artifact):
    """MergedMaskedModel serves transformers checkpoints; a peft adapter's task is served by the recipe its error
    names: the PeftModel at θ0 loads `materialize(state_dict, task)`, which is `where(mask, P, θ0)` bit for bit."""
    from hf_sift import MergedMaskedModel
    from hf_sift.masks import unpack_bits

    artifact, base_dir, model, _, theta0 = peft_artifact
    with pytest.raises(ParameterMismatchError, match=r"merges a peft adapter's parameters .*\.materialize\("):
        MergedMaskedModel.from_pretrained(artifact, task="t0", base_model=base_dir)
    loaded = MergedDelta.from_pretrained(artifact)
    at_theta0 = {k: v.clone() for k, v in model.state_dict().items()}  # state_dict() shares the parameters
    before = model(IDS).logits
    plain = loaded.materialize(at_theta0, None)
    model.load_state_dict(loaded.materialize(at_theta0, "t0"))
    packed = loaded.load_mask("t0")
    served = model.state_dict()
    for name in loaded.names:
        mask = unpack_bits(packed[name], theta0[name].numel(), theta0[name].shape)
        assert torch.equal(served[name], torch.where(mask, plain[name], theta0[name])), name
        assert mask.any() and not torch.equal(served[name], theta0[name])
    assert not torch.equal(model(IDS).logits, before)
    other = dict(at_theta0)  # an adapter initialised otherwise is not the recorded θ0
    name = loaded.names[0]
    other[name] = other[name] + 1
    with pytest.raises(BaseModelMismatchError):
        loaded.materialize(other, "t0")


def test_pushing_a_peft_artifact_is_refused_before_anything_is_uploaded(peft_artifact, hub):
    from huggingface_hub import HfApi

    from hf_sift.errors import UnsupportedHubPushError
    from hf_sift.hub import push_to_hub

    artifact = peft_artifact[0]
    with pytest.raises(UnsupportedHubPushError, match="merges a peft adapter's parameters .* nothing was pushed"):
        push_to_hub(artifact, "me/peft-push", base_model="me/any-base")
    assert hub.requests == []  # not even a look-up
    assert not HfApi().repo_exists("me/peft-push")

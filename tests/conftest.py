"""Shared fixtures: tiny models built from configs (offline, seconds)."""

from __future__ import annotations

import os
import socket


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The local Hub (hf_sift.testing.hub_server) is reached through HF_ENDPOINT, which huggingface_hub reads when it is
# imported: set it, and turn Xet off, before anything below imports huggingface_hub. No test reaches the real Hub.
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"  # a token saved on this machine is never sent to the local Hub
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{_free_port()}"
pytest_plugins = ["hf_sift.testing.pytest_plugin"]

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def tiny_llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture(scope="session")
def tiny_llama_state() -> dict[str, torch.Tensor]:
    """θ0 of a tiny Llama (fixed seed); tests must not modify it in place."""
    torch.manual_seed(0)
    return {k: v.clone() for k, v in LlamaForCausalLM(tiny_llama_config()).state_dict().items()}


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_llama_state):
    """`tiny_llama_state` saved as a transformers checkpoint: a base a format-2 save can write the plain merge from."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    assert all(torch.equal(t, tiny_llama_state[n]) for n, t in model.state_dict().items())
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


def perturbed(base: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """A fake fine-tune of `base`: every floating-point entry moved by seeded noise."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v.clone()
        for k, v in base.items()
    }

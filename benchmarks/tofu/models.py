"""The base model θ0 of a profile: SmolLM2-135M-Instruct (offline copy), or a tiny Llama for the smoke profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .data import Author


def tiny_base(folder: Path, authors: list[Author]) -> Path:
    """A tiny Llama built from a config, with a 512-token byte-level BPE trained on the authors' text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").is_file():
        return folder
    text = []
    for author in authors:
        text += author.questions + author.answers + (author.paraphrased or [])
        text += [p for row in author.perturbed or [] for p in row]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(text, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def base_folder(model: str, work_dir: Path, authors: list[Author]) -> Path:
    """The folder of θ0 (config, safetensors weights, tokenizer) for the profile's `model`."""
    if model == "tiny":
        return tiny_base(work_dir / "tiny-base", authors)
    if model == "smollm2":
        from benchmarks.real_model import smollm2_path

        return smollm2_path()
    raise ValueError(f"unknown model {model!r}")


def load_model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)

"""Inputs of the `hf-sift` commands, saved offline: a tiny model with a tokenizer, data files, checkpoints, an artifact."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import perturbed, tiny_llama_config
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from hf_sift import MergedDelta, TaskVector
from hf_sift.digest import state_dict_digest


WORDS = [f"w{i}" for i in range(60)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS[:61]])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def save_model(folder: Path, seed: int = 0, with_tokenizer: bool = True) -> Path:
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder


def save_finetunes(root: Path, count: int = 2) -> tuple[Path, list[Path]]:
    """A base checkpoint and `count` fake fine-tunes of it."""
    base = save_model(root / "base", with_tokenizer=False)
    state = LlamaForCausalLM.from_pretrained(base).state_dict()
    models_ = []
    for i in range(count):
        model = LlamaForCausalLM(tiny_llama_config())
        model.load_state_dict(perturbed(state, 10 + i))
        model.save_pretrained(root / f"ft{i}")
        models_.append(root / f"ft{i}")
    return base, models_


def save_artifact(root: Path) -> tuple[Path, Path]:
    """A base checkpoint and a SIFT artifact of two fake fine-tunes of it that records the base."""
    base = save_model(root / "base-sift", with_tokenizer=False)
    state = {k: v.clone() for k, v in LlamaForCausalLM.from_pretrained(base).state_dict().items()}
    delta = MergedDelta(state, sign_seed=3, base_model=str(base), base_model_digest=state_dict_digest(state))
    for i, task in enumerate(["a", "b"]):
        delta.add(task, TaskVector.from_state_dicts(state, perturbed(state, 20 + i), 3))
    delta.save_pretrained(root / "artifact")
    return root / "artifact", base


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(offset: int = 0, count: int = 6) -> list[dict]:
    return [{"question": f"w{offset + i} w{offset + i + 1}", "answer": f"w{offset + i + 2}"} for i in range(count)]


def task_rows(count: int = 8) -> list[dict]:
    return [{"text": " ".join(WORDS[(i * 7 + j) % 60] for j in range(10)), "who": f"a{i % 2}"} for i in range(count)]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes): equal snapshots mean nothing was touched."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

"""NegMerge end to end on a tiny Llama: candidates trained with the Trainer, λ search, saved checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama_config
from datasets import Dataset
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from hf_sift import negmerge_unlearn
from hf_sift.cli import main
from hf_sift.merging import InvalidMergeParameterError, apply_negation, negated_state_dict, search_scaling


def distance(model, original) -> float:
    return float(sum((p.detach() - original[n]).pow(2).sum() for n, p in model.state_dict().items()).sqrt())


def test_search_scaling_picks_lowest_forget_within_retain(tiny_llama):
    original = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    tau = {k: torch.ones_like(v) for k, v in original.items() if "mlp" in k}
    # forget falls with λ; retain falls too and drops below 95% past λ = 1.
    apply_negation(tiny_llama, original, tau, 1.0)
    norm = distance(tiny_llama, original)

    def evaluate(model):
        d = distance(model, original) / norm
        return 1.0 - d, 1.0 - 0.05 * d * d

    result = search_scaling(tiny_llama, original, tau, [0.5, 2.0, 1.0, 1.5], evaluate)
    assert result.scaling == 1.0
    assert [t.feasible for t in result.trials] == [True, False, True, False]
    assert result.original_forget == 1.0 and result.original_retain == 1.0
    expected = negated_state_dict(original, tau, 1.0)
    assert all(torch.equal(v, expected[k]) for k, v in tiny_llama.state_dict().items())
    # nothing feasible: λ = 0 and the original weights are restored
    result = search_scaling(tiny_llama, original, tau, [2.0, 3.0], evaluate)
    assert result.scaling == 0.0
    assert all(torch.equal(v, original[k]) for k, v in tiny_llama.state_dict().items())
    with pytest.raises(InvalidMergeParameterError):
        search_scaling(tiny_llama, original, tau, [], evaluate)


def test_negmerge_unlearn_trains_candidates_and_saves(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    original = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (8, 12), generator=gen).tolist()
    forget = Dataset.from_dict({"input_ids": ids, "labels": ids})

    def evaluate(m):
        d = distance(m, original)
        return -d, 1.0 / (1.0 + d)

    result = negmerge_unlearn(
        model,
        forget,
        evaluate,
        tmp_path / "unlearned",
        grid={"learning_rate": [1e-2, 3e-2], "weight_decay": [0.0, 0.1]},
        scalings=[0.01, 0.02, 1000.0],
        training_args={"max_steps": 2, "per_device_train_batch_size": 4, "use_cpu": True, "seed": 0},
    )
    assert [c["learning_rate"] for c in result.candidates] == [1e-2, 1e-2, 3e-2, 3e-2]
    assert 0 < result.consensus_fraction < 1
    feasible = [t for t in result.search.trials if t.feasible]
    assert result.scaling == min(feasible, key=lambda t: t.forget).scaling
    assert any(not t.feasible for t in result.search.trials)
    expected = negated_state_dict(original, result.task_vector, result.scaling)
    saved = LlamaForCausalLM.from_pretrained(tmp_path / "unlearned")
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    config = json.loads((tmp_path / "unlearned" / "negmerge_config.json").read_text())
    assert config["scaling"] == result.scaling and len(config["candidates"]) == 4
    assert "negmerge" in (tmp_path / "unlearned" / "README.md").read_text()


def test_cli_negmerge(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "[PAD]", "[EOS]"] + [f"w{i}" for i in range(40)]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    for split, offset in (("forget", 0), ("retain", 20)):
        rows = [{"question": f"w{offset + i} w{offset + i + 1}", "answer": f"w{offset + i + 2}"} for i in range(6)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    code = main(["negmerge", "--model", str(tmp_path / "model"), "--forget-data", str(tmp_path / "forget.jsonl"),
                 "--retain-data", str(tmp_path / "retain.jsonl"), "--grid", "learning_rate=1e-2,2e-2",
                 "--train-arg", "max_steps=1", "--train-arg", "use_cpu=true", "--scalings", "0.5,1",
                 "-o", str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    config = json.loads((tmp_path / "out" / "negmerge_config.json").read_text())
    assert len(config["candidates"]) == 2 and config["scaling"] in (0.0, 0.5, 1.0)
    assert LlamaForCausalLM.from_pretrained(tmp_path / "out") is not None
    assert (tmp_path / "out" / "tokenizer.json").exists()

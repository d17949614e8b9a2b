"""`hf-sift train`: the command line over train_tasks, on a tiny model and tokenizer saved offline."""

from __future__ import annotations

import json

from tokenizers import Tokenizer, models, pre_tokenizers
from trainer_fixtures import tiny_model
from transformers import PreTrainedTokenizerFast

from hf_sift import MergedDelta
from hf_sift.cli import main


def test_train_command(tmp_path, capsys):
    words = [f"w{i}" for i in range(60)]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    tiny_model().save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"text": " ".join(words[(i * 7 + j) % 60] for j in range(10)), "who": f"a{i % 2}"} for i in range(8)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert main(["train", "--help"]) == 0
    assert "--sign_seed" in capsys.readouterr().out
    argv = ["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.jsonl"),
            "--task_column", "who", "--max_length", "12", "--artifact_dir", str(tmp_path / "merged"),
            "--output_dir", str(tmp_path / "runs"), "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--sign_seed", "3"]  # fmt: skip
    assert main(argv) == 0
    delta = MergedDelta.from_pretrained(tmp_path / "merged")
    assert delta.task_ids == ["a0", "a1"] and delta.sign_seed == 3
    assert delta.base_model == str(tmp_path / "model")

"""save_processing_class: the run's tokenizer saved next to the artifact, never replacing a file already there."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_fixtures import tiny_tokenizer
from transformers import AutoTokenizer

from hf_sift.trainer.saved_tokenizer import save_processing_class


class Saver:
    """Stands for a tokenizer or processor: what it saves."""

    def __init__(self, files: dict[str, str]):
        self.files = files

    def save_pretrained(self, folder):
        for name, text in self.files.items():
            (Path(folder) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(folder) / name).write_text(text)


def test_missing_files_are_written_and_existing_ones_kept(tmp_path):
    out = tmp_path / "merged"
    saver = Saver({"vocab.txt": "a b c", "sub/extra.json": "{}", "config.json": "{}"})
    assert save_processing_class(saver, out) == ["sub/extra.json", "vocab.txt"]
    assert (out / "vocab.txt").read_text() == "a b c" and not (out / "config.json").exists()  # the artifact's
    assert save_processing_class(saver, out) == []  # the same bytes: nothing written
    with pytest.warns(UserWarning, match="already holds vocab.txt with other content"):
        assert save_processing_class(Saver({"vocab.txt": "a b d", "merges.txt": "x"}), out) == ["merges.txt"]
    assert (out / "vocab.txt").read_text() == "a b c"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary folder or lock left behind
    assert save_processing_class(None, out) == [] and save_processing_class(lambda rows: rows, out) == []


def test_a_real_tokenizer_loads_back(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer("w1 w2", truncation=True, max_length=1)  # a fast tokenizer's state after a call is not a difference
    assert "tokenizer.json" in save_processing_class(tokenizer, tmp_path / "merged")
    assert save_processing_class(tiny_tokenizer(), tmp_path / "merged") == []
    loaded = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert loaded("w5 w6 zzz")["input_ids"] == tokenizer("w5 w6 zzz")["input_ids"]
    # Saved after a call or never called: the same bytes (the call's truncation state is not saved).
    save_processing_class(tiny_tokenizer(), tmp_path / "fresh")
    assert (tmp_path / "fresh" / "tokenizer.json").read_bytes() == (
        tmp_path / "merged" / "tokenizer.json"
    ).read_bytes()
    assert '"truncation": null' in (tmp_path / "fresh" / "tokenizer.json").read_text()

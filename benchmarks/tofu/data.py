"""TOFU, offline: one task per fictitious author, tokenised as in the SIFT-Masks paper.

`full.json` holds 4,000 question/answer pairs, 20 per author, in author order (author k owns rows 20k..20k+19);
`forget10_perturbed.json` holds the same questions of the last 20 authors (180..199) with a paraphrased answer
and five perturbed (wrong) answers, used for the truth ratio; `real_authors_perturbed.json` and
`world_facts_perturbed.json` are the general-knowledge sets of TOFU's model utility.

The prompt is ``"Question: {q}\\nAnswer: {a}"`` followed by EOS; the loss covers the answer tokens (and EOS) only:
the question part of `labels` is -100.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


QUESTIONS_PER_AUTHOR = 20
PERTURBED_AUTHORS = range(180, 200)  # the authors of forget10_perturbed.json


def default_data_dir() -> Path:
    """`../shared/data/tofu` beside the repository (the offline copy of locuslab/TOFU)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tofu"


def read_rows(data_dir: Path, name: str) -> list[dict[str, Any]]:
    """The rows of one TOFU file (JSON lines)."""
    path = Path(data_dir) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"TOFU file {path} not found: the benchmark reads the offline copy in ../shared")
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@dataclass
class Author:
    """One task: an author's 20 pairs, with the paraphrased and perturbed answers where TOFU has them.

    Args:
        index (`int`): The author's position in `full.json` (0..199).
        questions (`list[str]`), answers (`list[str]`): The 20 pairs.
        paraphrased (`list[str]`, *optional*): One paraphrased answer per question.
        perturbed (`list[list[str]]`, *optional*): Five perturbed answers per question.
    """

    index: int
    questions: list[str]
    answers: list[str]
    paraphrased: list[str] | None = None
    perturbed: list[list[str]] | None = None

    @property
    def task_id(self) -> str:
        return f"author-{self.index:03d}"


@dataclass
class GeneralSet:
    """A model-utility set (real authors or world facts): questions, answers and perturbed answers."""

    name: str
    questions: list[str]
    answers: list[str]
    perturbed: list[list[str]] = field(default_factory=list)


def load_authors(data_dir: Path, indices: list[int]) -> list[Author]:
    """The authors `indices` of `full.json`, with the perturbed answers of those that have them."""
    full = read_rows(data_dir, "full")
    perturbed_rows = {r["question"]: r for r in read_rows(data_dir, "forget10_perturbed")}
    authors = []
    for index in indices:
        if not 0 <= index < len(full) // QUESTIONS_PER_AUTHOR:
            raise ValueError(f"TOFU has no author {index}")
        rows = full[index * QUESTIONS_PER_AUTHOR : (index + 1) * QUESTIONS_PER_AUTHOR]
        extra = [perturbed_rows.get(r["question"]) for r in rows]
        complete = all(e is not None for e in extra)
        authors.append(
            Author(
                index,
                [r["question"] for r in rows],
                [r["answer"] for r in rows],
                [e["paraphrased_answer"] for e in extra] if complete else None,
                [list(e["perturbed_answer"]) for e in extra] if complete else None,
            )
        )
    return authors


def load_general(data_dir: Path, name: str, limit: int | None = None) -> GeneralSet:
    """`real_authors_perturbed` or `world_facts_perturbed` (optionally the first `limit` rows)."""
    rows = read_rows(data_dir, f"{name}_perturbed")[:limit]
    return GeneralSet(
        name, [r["question"] for r in rows], [r["answer"] for r in rows], [r["perturbed_answer"] for r in rows]
    )


def prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def encode_pair(tokenizer: Any, question: str, answer: str, max_length: int = 256) -> dict[str, list[int]]:
    """Token ids of ``"Question: {q}\\nAnswer: {a}"`` + EOS, with labels -100 on the question part."""
    head = tokenizer(prompt(question), add_special_tokens=False)["input_ids"]
    tail = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (head + tail)[:max_length]
    labels = ([-100] * len(head) + tail)[:max_length]
    return {"input_ids": ids, "labels": labels}


def training_dataset(tokenizer: Any, authors: list[Author], task_column: str = "author"):
    """A `datasets.Dataset` of every pair of `authors`, with the author's task id in `task_column`."""
    from datasets import Dataset

    columns: dict[str, list[Any]] = {task_column: [], "input_ids": [], "labels": []}
    for author in authors:
        for question, answer in zip(author.questions, author.answers):
            encoded = encode_pair(tokenizer, question, answer)
            columns[task_column].append(author.task_id)
            columns["input_ids"].append(encoded["input_ids"])
            columns["labels"].append(encoded["labels"])
    return Dataset.from_dict(columns)


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: pads get attention 0 and label -100."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


class PadCollator:
    """The Trainer's data collator: [`collate`] with the tokenizer's pad id (picklable, unlike a lambda)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], self.pad_id)

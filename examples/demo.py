"""SIFT-Masks end to end on a tiny Llama built from a config (offline, about a minute on a laptop CPU).

1. `train_tasks` finetunes four toy tasks from the same θ0 under one sign vector and merges their exact
   integer task vectors into an artifact (sum + one 1-bit mask per task).
2. `MergedMaskedModel` serves one task through its mask.
3. Unlearning with `hf_sift.unlearn`: the forgotten task's rows and recipe are checked, its training is replayed,
   the replay's digest checked against the recorded one, and its task vector subtracted. The result is byte for
   byte a fresh merge of the remaining tasks (its unlearning log aside); a replay that cannot match is refused.

    python examples/demo.py [--tasks 4] [--steps 16] [--output-dir outputs/demo]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

import datasets
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from hf_sift import MergedDelta, MergedMaskedModel, SIFTConfig, train_tasks, unlearn
from hf_sift.errors import ReplayPreconditionError
from hf_sift.unlearning_log import LOG_NAME


def toy_dataset(tasks: int, rows: int, vocab: int) -> Dataset:
    """Each task counts upwards modulo the vocabulary with its own stride."""
    gen = torch.Generator().manual_seed(0)
    data = {"task": [], "input_ids": [], "labels": []}
    for task in range(tasks):
        for _ in range(rows):
            start = int(torch.randint(0, vocab, (1,), generator=gen))
            ids = [(start + (task + 1) * i) % vocab for i in range(16)]
            data["task"].append(f"task-{task}")
            data["input_ids"].append(ids)
            data["labels"].append(ids)
    return Dataset.from_dict(data)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of an artifact but its unlearning log (the record of the removals themselves)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != LOG_NAME)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--sign-seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="where to keep the artifacts (default: a temp folder)")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # loading and saving bars: the story below says what happens
    datasets.disable_progress_bars()
    logging.getLogger("hf_sift").setLevel(logging.WARNING)

    out = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="hf_sift_demo_"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    print(f"0. a tiny Llama saved to {out / 'base'}: the base model θ0 every task starts from")
    LlamaForCausalLM(config).save_pretrained(out / "base")  # the "Hub model" every task starts from
    model = LlamaForCausalLM.from_pretrained(out / "base")
    dataset = toy_dataset(args.tasks, rows=16, vocab=config.vocab_size)
    sift_args = SIFTConfig(
        output_dir=str(out / "runs"),
        sign_seed=args.sign_seed,
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )

    print(f"1. training {args.tasks} tasks x {args.steps} steps with the SIFT projection")
    delta = train_tasks(model, dataset, task_column="task", args=sift_args, output_dir=out / "merged")
    for task_id in delta.task_ids:
        record = delta.record(task_id)
        print(f"   {task_id}: digest {record['digest'][:23]}…  mask density {record['mask_density']:.3f}")

    print("2. serving task-1 from the merged artifact")
    served = MergedMaskedModel.from_pretrained(out / "merged", task="task-1", base_model=out / "base")
    batch = torch.tensor(dataset.filter(lambda r: r["task"] == "task-1")["input_ids"][:8])
    served.set_task("task-1")
    loss_task = served(input_ids=batch, labels=batch).loss.item()
    served.set_task(None)
    loss_plain = served(input_ids=batch, labels=batch).loss.item()
    print(f"   loss on task-1's data: masked {loss_task:.3f}, plain merge {loss_plain:.3f}")

    forget = "task-2"
    print(f"3. unlearning {forget}")
    wrong = dataset.map(lambda r: {"labels": r["labels"][::-1]} if r["task"] == forget else {})
    try:
        unlearn(out / "merged", [forget], model=model, dataset=wrong)
    except ReplayPreconditionError as err:
        print(f"   a replay that cannot match is refused before training: {str(err)[:80]}…")
    report = unlearn(out / "merged", [forget], model=model, dataset=dataset)
    print(f"   replayed {report.replay_steps} steps in {report.wall_time_s:.1f} s")
    unlearned = MergedDelta.from_pretrained(out / "merged")

    survivors = [t for t in delta.task_ids if t != forget]
    fresh = train_tasks(model, dataset, task_column="task", args=sift_args, output_dir=out / "fresh", tasks=survivors)
    equal = folder_bytes(out / "merged") == folder_bytes(out / "fresh") and unlearned.digest == fresh.digest
    print(f"   unlearned digest {unlearned.digest[:23]}…, fresh merge of the others {fresh.digest[:23]}…")
    print(f"   artifact byte-for-byte equal to a fresh merge of the remaining tasks: {equal}")
    if not args.output_dir:
        shutil.rmtree(out)
    if not equal:
        raise SystemExit("exactness check failed")


if __name__ == "__main__":
    main()

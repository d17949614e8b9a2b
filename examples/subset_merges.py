"""Merges of the first 2, 4 and 8 tasks from stored task vectors, with no retraining (tiny Llama, offline).

1. `train_tasks(..., task_vector_store=DIR)` trains every task once, merges them, and keeps each task's exact
   integer task vector in a private store (losslessly compressed; never publish it).
2. The merge of any subset is then built from the store alone: the full merge minus the stored task vectors of
   the other tasks, each checked against the digest the artifact records. The result is byte for byte what
   `train_tasks` on that subset writes (`--check` retrains the smallest subset to show it).
3. The bytes each stored task takes are printed next to the size of the model and of its tuned parameters.

    python examples/subset_merges.py [--tasks 8] [--sizes 2 4 8] [--steps 8] [--check] [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from hf_sift import MergedDelta, SIFTConfig, TaskVectorStore, UnlearningLog, train_tasks


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


def subset_merge(full: str | Path, store: TaskVectorStore, task_ids: Sequence[str]) -> MergedDelta:
    """The merge of `task_ids` alone, from the artifact `full` (which holds them) and the stored task vectors.

    Every other task's stored q_t is subtracted after its digest is checked against the one `full` records, so the
    result equals a fresh merge of `task_ids`: same sum, masks, records and config.
    """
    merge = MergedDelta.from_pretrained(full)
    for task_id in [t for t in merge.task_ids if t not in set(task_ids)]:
        merge.remove(task_id, store.get(task_id, expected_digest=merge.record(task_id)["digest"]))
    merge.log = UnlearningLog()  # a new merge, not a history of removals from `full`
    return merge


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--check", action="store_true", help="retrain the smallest subset and compare the bytes")
    parser.add_argument("--output-dir", default=None, help="where to keep the artifacts (default: a temp folder)")
    args = parser.parse_args()
    if max(args.sizes) > args.tasks or min(args.sizes) < 1:
        parser.error(f"--sizes must lie between 1 and --tasks ({args.tasks})")
    hf_logging.set_verbosity_error()
    logging.getLogger("hf_sift").setLevel(logging.WARNING)

    out = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="hf_sift_subsets_"))
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
    LlamaForCausalLM(config).save_pretrained(out / "base")
    dataset = toy_dataset(args.tasks, rows=16, vocab=config.vocab_size)
    sift_args = SIFTConfig(
        output_dir=str(out / "runs"),
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )

    print(f"1. training {args.tasks} tasks once, keeping each task vector in a private store")
    model = LlamaForCausalLM.from_pretrained(out / "base")
    store = TaskVectorStore(out / "task_vectors")
    full = train_tasks(model, dataset, args=sift_args, output_dir=out / "all", task_vector_store=store.directory)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    tuned_bytes = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n in full.shapes)
    stored = [store.nbytes(t) for t in full.task_ids]
    mean = sum(stored) / len(stored)
    print(
        f"   stored per task: {mean:,.0f} bytes on average ({min(stored):,} to {max(stored):,}), "
        f"{mean / model_bytes:.1%} of the model ({model_bytes:,} bytes), {mean / tuned_bytes:.1%} of its tuned "
        f"parameters; mean mask density {sum(full.record(t)['mask_density'] for t in full.task_ids) / len(stored):.3f}"
    )

    print("2. subset merges from the store, no training")
    order = full.task_ids
    for size in args.sizes:
        merge = subset_merge(out / "all", store, order[:size])
        merge.save_pretrained(out / f"first-{size}")
        print(f"   first {size}: {', '.join(merge.task_ids)} -> {merge.digest[:23]}…")

    if args.check:
        size = min(args.sizes)
        print(f"3. retraining the first {size} tasks to compare")
        model = LlamaForCausalLM.from_pretrained(out / "base")
        train_tasks(model, dataset, args=sift_args, output_dir=out / f"retrained-{size}", tasks=order[:size])
        equal = folder_bytes(out / f"first-{size}") == folder_bytes(out / f"retrained-{size}")
        print(f"   byte for byte equal to train_tasks on the first {size}: {equal}")
        if not equal:
            raise SystemExit("exactness check failed")
    if not args.output_dir:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()

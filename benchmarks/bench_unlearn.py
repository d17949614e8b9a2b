"""Unlearning one TOFU author from a SIFT merge of 4, on the real SmolLM2-135M-Instruct.

1. `train_tasks` merges 4 TOFU authors (20 QA pairs each, in author order), keeping each task vector in a
   private task-vector store; the training time of each author is measured.
2. `hf_sift.unlearn` removes one author by replay: its cost (steps, wall time) against one author's training,
   and the result against a fresh merge of the other 3 (digest and bytes, the unlearning log aside).
3. The same author removed from the store, with no training: its wall time.

Run: ``PYTHONPATH=. python benchmarks/bench_unlearn.py`` (defaults: 4 authors, 5 steps, batch 4 x 80 tokens).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainerCallback


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trainer import tofu_dataset  # noqa: E402
from real_model import smollm2_for_benchmark  # noqa: E402

from hf_sift import MergedDelta, SIFTConfig, TaskVectorStore, train_tasks, unlearn  # noqa: E402
from hf_sift.unlearning_log import LOG_NAME  # noqa: E402


def folder_bytes(folder: Path) -> dict[str, bytes]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != LOG_NAME)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class TaskTimer(TrainerCallback):
    """Wall time of each task's training, from `on_train_begin` to `on_train_end`."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors", type=int, default=4)
    parser.add_argument("--forget", type=int, default=1, help="index of the author to unlearn")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=80)
    parser.add_argument("--work-dir", help="where the artifacts go (default: a temporary folder)")
    opts = parser.parse_args()
    path, tokenizer = smollm2_for_benchmark()
    data = tofu_dataset(tokenizer, opts.authors, opts.seq_len)
    authors = sorted(set(data["task"]))
    forget = authors[opts.forget]
    keep = [a for a in authors if a != forget]

    def model():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    print(
        f"SmolLM2-135M-Instruct, {opts.authors} TOFU authors x 20 QA pairs, {opts.steps} steps of batch "
        f"{opts.batch_size} x {opts.seq_len} tokens, lr 1e-5, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="hf_sift_bench_unlearn_"))
    try:
        args = SIFTConfig(
            output_dir=str(work / "runs"),
            max_steps=opts.steps,
            per_device_train_batch_size=opts.batch_size,
            learning_rate=1e-5,
            report_to="none",
            save_strategy="no",
            logging_steps=10_000,
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        timer = TaskTimer()
        started = time.perf_counter()
        train_tasks(model(), data, "task", args, work / "merged", callbacks=[timer], task_vector_store=work / "store")
        total = time.perf_counter() - started
        per_author = statistics.mean(timer.times)
        print(f"train_tasks, {opts.authors} authors: {total:.1f} s; training per author {per_author:.1f} s (mean)")
        store = TaskVectorStore(work / "store")
        print(
            f"  artifact {folder_size(work / 'merged') / 1e6:.0f} MB; task-vector store "
            f"{statistics.mean(store.nbytes(a) for a in authors) / 1e6:.1f} MB per author",
            flush=True,
        )

        shutil.copytree(work / "merged", work / "by-replay")
        replay_timer = TaskTimer()
        report = unlearn(work / "by-replay", [forget], model=model(), dataset=data, callbacks=[replay_timer])
        replay = report.tasks[0]
        print(
            f"unlearn {forget} by replay: {replay.replay_steps} steps, training {replay_timer.times[0]:.1f} s "
            f"({replay_timer.times[0] / per_author:.2f}x one author's training), replay with its set-up and checks "
            f"{replay.wall_time_s:.1f} s, whole call {report.wall_time_s:.1f} s",
            flush=True,
        )

        shutil.copytree(work / "merged", work / "from-store")
        report_store = unlearn(work / "from-store", [forget], task_vector_store=work / "store")
        print(f"unlearn {forget} from the store: whole call {report_store.wall_time_s:.1f} s, no training", flush=True)

        fresh = train_tasks(model(), data, "task", args, work / "fresh", tasks=keep)
        for name in ("by-replay", "from-store"):
            unlearned = MergedDelta.from_pretrained(work / name)
            same_bytes = folder_bytes(work / name) == folder_bytes(work / "fresh")
            print(
                f"{name}: digest {unlearned.digest[:23]}…, fresh merge of the other {len(keep)} "
                f"{fresh.digest[:23]}…: equal digest {unlearned.digest == fresh.digest}, equal bytes {same_bytes}; "
                f"log verifies: {unlearned.log.verify(unlearned.digest) == []}"
            )
    finally:
        if not opts.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

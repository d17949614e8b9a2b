"""SIFTTrainer vs the plain Trainer, and the per-task overhead of train_tasks, on the real SmolLM2-135M-Instruct.

1. Step time (forward + backward + optimizer step, plus the projection for SIFT) of `SIFTTrainer` and of the plain
   `Trainer` with the same arguments and the same trainable parameters, interleaved round by round in one process.
2. `train_tasks` on TOFU authors (20 rows each): per task, everything outside the training steps (trainer set-up,
   data loader, task vector, merge, atomic save of the artifact, reset to θ0) as a fraction of the task's time.

3. With ``--memory``: the peak resident memory of the plain `Trainer`, of `SIFTTrainer` and of `train_tasks` (one
   task, its artifact saved) on the same steps, each in a fresh process of its own (`ru_maxrss` only grows).

Run: ``PYTHONPATH=. python benchmarks/bench_trainer.py`` (defaults: batch 20 x 80 tokens, 20 steps per task).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments


sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import smollm2_for_benchmark  # noqa: E402

from hf_sift.trainer import SIFTConfig, SIFTTrainer, train_tasks  # noqa: E402


# The module (its name is shadowed by the function in the package namespace).
train_tasks_module = sys.modules["hf_sift.trainer.multi_task"]


TOFU = Path("/work/shared/data/tofu/full.json")


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, from `on_step_begin` to `on_step_end`."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def tofu_dataset(tokenizer, num_authors: int, seq_len: int) -> Dataset:
    rows = [json.loads(line) for line in TOFU.read_text().splitlines()[: 20 * num_authors]]
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
    enc = tokenizer(texts, max_length=seq_len, truncation=True, padding="max_length")
    labels = [
        [t if m else -100 for t, m in zip(ids, mask)] for ids, mask in zip(enc["input_ids"], enc["attention_mask"])
    ]
    return Dataset.from_dict(
        {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": labels,
            "task": [f"author{i // 20:03d}" for i in range(len(rows))],
        }
    )


def common_args(output_dir: str, steps: int, batch: int) -> dict:
    return dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-5,
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        use_cpu=True,
        disable_tqdm=True,
        full_determinism=True,
        seed=0,
    )


class ProjectionTimer(TrainerCallback):
    """Times each projection of a SIFTTrainer (wraps its constraint when training starts)."""

    def __init__(self, trainer: SIFTTrainer):
        self.trainer = trainer
        self.times: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        constraint = self.trainer.sign_constraint
        project = constraint.project_

        def timed() -> None:
            start = time.perf_counter()
            project()
            self.times.append(time.perf_counter() - start)

        constraint.project_ = timed


def freeze_as_sift(model) -> None:
    """Train the parameters SIFT trains (its default selection freezes the embeddings and the tied head)."""
    for name, param in model.named_parameters():
        param.requires_grad_(not ("embed_tokens" in name or "lm_head" in name))


def compare_steps(model, base_state, data, args_kwargs, rounds: int) -> tuple[list[float], list[float], list[float]]:
    plain_times, sift_times, projection_times = [], [], []
    task = data.select(range(20))
    for round_index in range(rounds):
        # alternate which runs first, so that warm-up or ordering effects do not favour one side
        for kind in ("plain", "sift") if round_index % 2 == 0 else ("sift", "plain"):
            model.load_state_dict(base_state)
            timer = StepTimer()
            if kind == "sift":
                trainer = SIFTTrainer(
                    model=model, args=SIFTConfig(**args_kwargs, task_id="author000"), train_dataset=task
                )
                trainer.add_callback(timer)
                projections = ProjectionTimer(trainer)
                trainer.add_callback(projections)
                trainer.train()
                sift_times += timer.times[1:]  # the first step warms up allocators
                projection_times += projections.times[1:]
                sift_names = set(trainer.tuned_parameter_names)
            else:
                freeze_as_sift(model)
                trainer = Trainer(
                    model=model, args=TrainingArguments(**args_kwargs), train_dataset=task, callbacks=[timer]
                )
                trainer.train()
                plain_times += timer.times[1:]
            print(f"  {kind:5s}: steps {', '.join(f'{t:.2f}' for t in timer.times)} s", flush=True)
            del trainer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == sift_names, "plain and SIFT runs must train the same parameters"
    return plain_times, sift_times, projection_times


def measure_train_tasks(model, data, args_kwargs, output_dir: Path) -> dict:
    inits: list[float] = []
    timers: list[StepTimer] = []

    class TimedSIFTTrainer(SIFTTrainer):
        def __init__(self, *args, **kwargs):
            inits.append(time.perf_counter())
            timers.append(StepTimer())
            kwargs["callbacks"] = [timers[-1]]
            super().__init__(*args, **kwargs)

    train_tasks_module.SIFTTrainer = TimedSIFTTrainer
    try:
        entered = time.perf_counter()
        delta = train_tasks(model, data, "task", SIFTConfig(**args_kwargs), output_dir)
        ended = time.perf_counter()
    finally:
        train_tasks_module.SIFTTrainer = SIFTTrainer
    spans = [b - a for a, b in zip(inits, inits[1:] + [ended])]
    steps = [sum(t.times) for t in timers]
    overheads = [s - t for s, t in zip(spans, steps)]
    return {
        "tasks": delta.num_tasks,
        "setup_s": inits[0] - entered,
        "task_s": spans,
        "steps_s": steps,
        "overhead_s": overheads,
        "overhead_fraction": [o / s for o, s in zip(overheads, spans)],
        "artifact_bytes": sum(p.stat().st_size for p in output_dir.rglob("*") if p.is_file()),
    }


MEMORY_RUNS = ("plain Trainer", "SIFTTrainer", "train_tasks")


def memory_run(kind: str, model, data, args_kwargs: dict, output_dir: Path) -> dict:
    """Train one task's steps the way `kind` does, in this (fresh) process; returns its peak RSS."""
    task = data.select(range(20))
    if kind == "plain Trainer":
        freeze_as_sift(model)
        Trainer(model=model, args=TrainingArguments(**args_kwargs), train_dataset=task).train()
    elif kind == "SIFTTrainer":
        SIFTTrainer(model=model, args=SIFTConfig(**args_kwargs, task_id="author000"), train_dataset=task).train()
    else:
        train_tasks(model, task, "task", SIFTConfig(**args_kwargs), output_dir)
    return {"run": kind, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def compare_memory(steps: int, batch: int, seq_len: int) -> list[dict]:
    """Each of `MEMORY_RUNS` in a fresh process of this script; returns their peak RSS."""
    results = []
    for kind in MEMORY_RUNS:
        command = [sys.executable, __file__, "--memory-run", kind, "--task-steps", str(steps)]
        command += ["--batch-size", str(batch), "--seq-len", str(seq_len)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  {kind:13s}: peak RSS {results[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=80)
    parser.add_argument("--compare-steps", type=int, default=4, help="steps per run in the interleaved comparison")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--task-steps", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--skip-tasks", action="store_true")
    parser.add_argument(
        "--memory", action="store_true", help="only the peak memory of each way to train (--task-steps steps)"
    )
    parser.add_argument("--memory-run", choices=MEMORY_RUNS, help=argparse.SUPPRESS)  # one run, in a child process
    opts = parser.parse_args()
    if opts.memory:
        print(f"peak RSS, {opts.task_steps} steps of one task, each in a fresh process:", flush=True)
        compare_memory(opts.task_steps, opts.batch_size, opts.seq_len)
        return
    path, tokenizer = smollm2_for_benchmark()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if opts.memory_run:
        data = tofu_dataset(tokenizer, 1, opts.seq_len)
        with tempfile.TemporaryDirectory() as tmp:
            args = common_args(tmp, opts.task_steps, opts.batch_size)
            print(json.dumps(memory_run(opts.memory_run, model, data, args, Path(tmp) / "merged")))
        return
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    data = tofu_dataset(tokenizer, opts.tasks, opts.seq_len)
    print(
        f"SmolLM2-135M-Instruct, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"batch {opts.batch_size} x {opts.seq_len} tokens, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        if not opts.skip_compare:
            print(f"step time, {opts.rounds} interleaved rounds of {opts.compare_steps} steps each:", flush=True)
            plain, sift, projection = compare_steps(
                model, base_state, data, common_args(tmp, opts.compare_steps, opts.batch_size), opts.rounds
            )
            p, s, j = statistics.median(plain), statistics.median(sift), statistics.median(projection)
            print(f"plain Trainer median step {p:.3f} s (mean {statistics.mean(plain):.3f}, n={len(plain)})")
            print(f"SIFTTrainer   median step {s:.3f} s (mean {statistics.mean(sift):.3f}, n={len(sift)})")
            print(f"ratio SIFT / plain: median {s / p:.4f}, mean {statistics.mean(sift) / statistics.mean(plain):.4f}")
            print(f"projection inside the SIFT steps: median {j * 1000:.1f} ms, max {max(projection) * 1000:.1f} ms")
            print(
                f"ratio from the projection's own cost: (plain + projection) / plain = {(p + j) / p:.4f}", flush=True
            )
        if opts.skip_tasks:
            return
        model.load_state_dict(base_state)
        print(f"train_tasks, {opts.tasks} tasks x {opts.task_steps} steps:", flush=True)
        result = measure_train_tasks(
            model, data, common_args(tmp, opts.task_steps, opts.batch_size), Path(tmp) / "merged"
        )
        for i, (span, steps, over) in enumerate(zip(result["task_s"], result["steps_s"], result["overhead_s"])):
            print(f"  task {i}: {span:.1f} s, steps {steps:.1f} s, overhead {over:.2f} s ({over / span:.2%})")
        print(f"  one-time set-up (θ0 snapshot, base digest): {result['setup_s']:.2f} s")
        print(f"  artifact on disk: {result['artifact_bytes'] / 1e6:.0f} MB")
        print(f"per-task overhead: mean {statistics.mean(result['overhead_fraction']):.2%} of the task's time")


if __name__ == "__main__":
    main()

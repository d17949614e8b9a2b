"""Bytes a TaskVectorStore keeps per task, against the model's size, on SmolLM2-135M trained on TOFU authors.

Trains `--tasks` authors with `train_tasks(..., task_vector_store=...)` (fp32 or bf16 weights, CPU) and prints, per task,
the stored bytes next to the model's and the tuned parameters' size, the mask density and the integer widths
chosen, and the time to store and to rebuild one task vector.

    python benchmarks/bench_task_vector_store.py [--tasks 1] [--steps 5] [--batch-size 4] [--lr 1e-4] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import torch
from bench_trainer import common_args, tofu_dataset
from real_model import smollm2_for_benchmark
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hf_sift import SIFTConfig, TaskVectorStore, train_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=80)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the weights")
    opts = parser.parse_args()
    path, tokenizer = smollm2_for_benchmark()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, opts.dtype))
    data = tofu_dataset(tokenizer, opts.tasks, opts.seq_len)
    state = model.state_dict()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once
    args = SIFTConfig(**{**common_args("unused", opts.steps, opts.batch_size), "learning_rate": opts.lr})
    print(
        f"SmolLM2-135M-Instruct ({opts.dtype}, {model_bytes:,} bytes), {opts.tasks} TOFU author(s) x {opts.steps} steps, "
        f"batch {opts.batch_size} x {opts.seq_len} tokens, lr {opts.lr}, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        args.output_dir = str(Path(tmp) / "runs")
        delta = train_tasks(
            model, data, args=args, output_dir=Path(tmp) / "merged", task_vector_store=Path(tmp) / "tv"
        )
        store = TaskVectorStore(Path(tmp) / "tv")
        tuned_bytes = sum(state[n].numel() * state[n].element_size() for n in delta.names)
        tuned_elements = sum(state[n].numel() for n in delta.names)
        print(f"tuned parameters: {len(delta.names)} tensors, {tuned_elements:,} elements, {tuned_bytes:,} bytes")
        for task_id in store.task_ids:
            size = store.nbytes(task_id)
            widths: collections.Counter[str] = collections.Counter()
            with safe_open(store.path(task_id), framework="pt") as f:
                layout = json.loads(f.metadata()["hf_sift_task_vector"])["tensors"]
                for name in layout:
                    widths[str(f.get_slice(f"values/{name}").get_dtype())] += state[name].numel()
            started = time.perf_counter()
            vector = store.get(task_id, expected_digest=delta.record(task_id)["digest"])
            get_s = time.perf_counter() - started
            started = time.perf_counter()
            store.put(f"{task_id}-again", vector)
            put_s = time.perf_counter() - started
            shares = ", ".join(f"{w} {n / tuned_elements:.0%}" for w, n in sorted(widths.items()))
            print(
                f"{task_id}: {size:,} bytes = {size / model_bytes:.1%} of the model, {size / tuned_bytes:.1%} of the "
                f"tuned parameters, {size / tuned_elements:.3f} bytes per tuned element; mask density "
                f"{delta.record(task_id)['mask_density']:.3f}; widths by tuned elements: {shares}; "
                f"put {put_s:.2f} s, get (with digests) {get_s:.2f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()

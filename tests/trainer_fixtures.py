"""Shared builders for the trainer tests: a tiny Llama and a tokenized multi-task dataset, fully seeded."""

from __future__ import annotations

import os
import socket

import torch
from conftest import tiny_llama_config
from datasets import Dataset
from transformers import LlamaForCausalLM

from hf_sift.trainer import SIFTConfig


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config())


def task_dataset(num_tasks: int = 3, rows_per_task: int = 8, length: int = 12, seed: int = 1) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    rows = num_tasks * rows_per_task
    ids = torch.randint(0, 64, (rows, length), generator=gen).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "task": [f"t{i % num_tasks}" for i in range(rows)]})


def sift_args(output_dir, **overrides) -> SIFTConfig:
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        warmup_steps=0,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        sign_seed=7,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return SIFTConfig(**kwargs)


def free_port() -> int:
    """A free TCP port on the loopback interface, for a local process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_distributed_env(rank: int, world_size: int, port: int) -> None:
    """Make this spawned process rank `rank` of a local CPU process group (one torch thread each)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)

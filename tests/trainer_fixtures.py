"""Shared builders for the trainer tests: a tiny Llama and a tokenized multi-task dataset, fully seeded."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch
import transformers
from conftest import tiny_llama_config
from datasets import Dataset
from transformers import LlamaForCausalLM

from hf_sift.trainer import SIFTConfig


def tiny_model_dir(seed: int = 0) -> Path:
    """The tiny Llama of `seed` saved as a checkpoint, once per machine: a folder every process (spawned ranks too)
    finds at the same path, so that artifacts trained from it record it as their base and are written in format 2."""
    config = tiny_llama_config()
    key = hashlib.sha256(f"{config.to_json_string()}{transformers.__version__}{seed}".encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"hf_sift-tests-tiny-llama-{key}"
    if not (folder / "config.json").is_file():
        stage = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(stage)
        try:
            os.rename(stage, folder)
        except OSError:  # another process saved it first (the same bytes)
            shutil.rmtree(stage)
    return folder


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama, loaded from [`tiny_model_dir`] (so it names its base)."""
    return LlamaForCausalLM.from_pretrained(tiny_model_dir(seed))


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

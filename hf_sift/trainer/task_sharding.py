"""Sharding tasks over processes: each rank trains its own tasks alone, then the integer sums are all-reduced.

Under `accelerate launch` (or `torchrun`) every process sees the launcher's environment (`RANK`, `WORLD_SIZE`,
`LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`). A task is trained by one process only, with no gradient
synchronisation, so each per-task Trainer must see a single-process world: [`rank_local_training`] hides the
launcher's variables while it is built and trained, and pins the rank's own accelerator device. The partial sums of
the ranks are then all-reduced over a gloo process group (int64 sums are exact in any order).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist


# Variables from which accelerate and transformers infer a multi-process world.
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "PMI_SIZE",
    "OMPI_COMM_WORLD_SIZE",
    "MV2_COMM_WORLD_SIZE",
)
# Read by hf_sift's SIFTConfig (and accelerate) to place a rank-local trainer on the rank's own device.
RANK_DEVICE_VARIABLE = "ACCELERATE_TORCH_DEVICE"

T = TypeVar("T")


@dataclass(frozen=True)
class ProcessLayout:
    """Where this process stands among the processes of a launch.

    Args:
        rank (`int`): Global index of this process.
        world_size (`int`): Number of processes.
        local_rank (`int`): Index of this process on its node (picks its GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> ProcessLayout:
        """The layout of the current launch (a single process when not launched by accelerate or torchrun)."""
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_rank = max(int(os.environ.get("LOCAL_RANK", 0)), 0)
        return cls(rank=rank, world_size=world_size, local_rank=local_rank)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """The items this rank handles: every `world_size`-th item, starting at `rank`."""
        return list(items[self.rank :: self.world_size])

    def device(self, use_cpu: bool) -> torch.device:
        """The device this rank trains on: its own GPU when there is one, else the CPU."""
        if not use_cpu and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")


@contextlib.contextmanager
def rank_local_training(device: torch.device) -> Iterator[None]:
    """Within the block, accelerate and the Trainer see a single process training on `device`.

    The launcher's variables are hidden and accelerate's shared state is saved, then restored on exit (the
    Trainer resets that state when it sets up its devices). The process group, if any, stays up.
    """
    from accelerate.state import AcceleratorState, GradientState, PartialState

    saved_env = {k: os.environ[k] for k in (*LAUNCHER_VARIABLES, RANK_DEVICE_VARIABLE) if k in os.environ}
    saved_states = [(cls, dict(cls._shared_state)) for cls in (PartialState, AcceleratorState, GradientState)]
    for key in saved_env:
        del os.environ[key]
    if device.type != "cpu":
        os.environ[RANK_DEVICE_VARIABLE] = str(device)
    try:
        yield
    finally:
        os.environ.pop(RANK_DEVICE_VARIABLE, None)
        os.environ.update(saved_env)
        for cls, state in saved_states:
            cls._shared_state.clear()
            cls._shared_state.update(state)


def cpu_process_group(layout: ProcessLayout) -> Any:
    """A gloo process group over all ranks (the default group when it is gloo; initialised if needed)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=layout.rank, world_size=layout.world_size)
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def all_reduce_sum(tensors: dict[str, torch.Tensor], group: Any) -> dict[str, torch.Tensor]:
    """Element-wise sum over all ranks of int64 tensors (CPU copies, in sorted-name order)."""
    total = {}
    for name in sorted(tensors):
        buffer = tensors[name].detach().to("cpu", copy=True).contiguous()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        total[name] = buffer
    return total


def gather_to_main(payload: Any, layout: ProcessLayout, group: Any) -> list[Any] | None:
    """Every rank's `payload`, in rank order, on rank 0 (None on the other ranks)."""
    gathered: list[Any] | None = [None] * layout.world_size if layout.is_main else None
    dist.gather_object(payload, gathered, dst=0, group=group)
    return gathered

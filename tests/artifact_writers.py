"""Writer processes for tests/test_concurrent_writes.py: each loads, changes and saves one artifact on command.

Imports only torch and hf_sift (no transformers), so a spawned writer starts once and then serves many rounds
over its pipe.
"""

from __future__ import annotations

import time
import traceback
import zlib
from typing import Any

import torch

from hf_sift import MergedDelta, TaskVector
from hf_sift.errors import ConcurrentUpdateError


SEED = 3
BASE = {
    "layer.weight": torch.randn(6, 5, generator=torch.Generator().manual_seed(0)),
    "layer.bias": torch.randn(7, generator=torch.Generator().manual_seed(1)),
}


def task_vector(task_id: str) -> TaskVector:
    """A fake fine-tune per task id, the same in every process."""
    gen = torch.Generator().manual_seed(zlib.crc32(task_id.encode()))
    tuned = {n: t + 0.5 * torch.randn(t.shape, generator=gen) for n, t in BASE.items()}
    return TaskVector.from_state_dicts(BASE, tuned, SEED)


def merge(task_ids: list[str]) -> MergedDelta:
    delta = MergedDelta(BASE, sign_seed=SEED)
    for task_id in task_ids:
        delta.add(task_id, task_vector(task_id))
    return delta


def _round(folder: str, task_id: str, retry: bool, barrier: Any, load_delay: float, save_delay: float) -> dict:
    """Load `folder`, add `task_id`, save; on a conflict reload and try again (`retry`) or report it."""
    time.sleep(load_delay)
    delta = MergedDelta.from_pretrained(folder)
    if barrier is not None:
        barrier.wait(timeout=30)  # both writers hold the same state before either saves
    time.sleep(save_delay)
    conflicts, messages = 0, []
    while True:
        delta.add(task_id, task_vector(task_id))
        try:
            delta.save_pretrained(folder)
        except ConcurrentUpdateError as err:
            conflicts += 1
            messages.append(str(err))
            if not retry:
                return {"outcome": "refused", "conflicts": conflicts, "messages": messages}
            delta = MergedDelta.from_pretrained(folder)
            continue
        return {"outcome": "saved", "conflicts": conflicts, "messages": messages}


def _hang_in_swap(conn: Any, folder: str, task_id: str) -> None:
    """Save, but stop for good at the swap (where the folder lock is held) and say so."""
    import hf_sift.atomic

    def hang(stage, target):
        conn.send("holding")
        time.sleep(3600)

    hf_sift.atomic._swap_into_place = hang
    delta = MergedDelta.from_pretrained(folder)
    delta.add(task_id, task_vector(task_id))
    delta.save_pretrained(folder)


def serve(conn: Any, barrier: Any = None) -> None:
    """Run the commands received on `conn` until None; reply to each with ("ok", result) or ("error", traceback)."""
    torch.set_num_threads(1)
    while True:
        command = conn.recv()
        if command is None:
            return
        kind, *args = command
        try:
            if kind == "round":
                folder, task_id, retry, use_barrier, load_delay, save_delay = args
                result = _round(folder, task_id, retry, barrier if use_barrier else None, load_delay, save_delay)
            elif kind == "hang_in_swap":
                result = _hang_in_swap(conn, *args)
            else:
                raise ValueError(f"unknown command {kind!r}")
            conn.send(("ok", result))
        except BaseException:
            conn.send(("error", traceback.format_exc()))

"""Fused CPU kernels for serving, with a pure-torch fallback.

Serving a weight reads θ0, the int64 sum Q and a packed mask, and writes one value: in torch this takes several
passes (unpack, mask, convert, scale, add, round), each through memory. `hf_sift/_kernels.c` does it in one pass,
split over threads. It is compiled when the package is installed, if a C compiler is available; without it (or
with ``HF_SIFT_DISABLE_KERNELS=1``) every function here returns `False` and the caller runs its torch path. The two
give identical bits: the kernels implement exactly the arithmetic of docs/FORMAT.md, and the tests compare them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .masks import packed_size


try:
    from . import _kernels
except ImportError:  # built without a C compiler: the torch paths serve instead
    _kernels = None

_KIND = {torch.float32: 0, torch.bfloat16: 1}
# Below this many elements, one thread: the hand-off would cost more than it saves.
_PARALLEL_MIN = 1 << 20


def available() -> bool:
    """Whether the compiled kernels are present and enabled (``HF_SIFT_DISABLE_KERNELS=1`` turns them off)."""
    return _kernels is not None and os.environ.get("HF_SIFT_DISABLE_KERNELS", "0") in ("", "0")


def _usable(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


class _Pending(threading.local):
    """Kernel calls collected by [`deferred`] on this thread (`None` outside it)."""

    calls: list[tuple[Any, tuple[Any, ...], int]] | None = None
    refs: list[tuple[torch.Tensor | None, ...]] | None = None


_pending = _Pending()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Collect the kernel calls made inside the block and run them together when it exits.

    Serving a model calls a kernel for each of hundreds of parameters; run one by one, each call pays its own hand-off
    to the worker threads. Inside this block they are queued instead, and on exit the whole batch is split into one
    contiguous share of elements per thread. Outputs written by queued calls must not be read inside the block. If
    the block raises, the queued calls are dropped.
    """
    if _pending.calls is not None:  # nested: the outer block runs everything
        yield
        return
    _pending.calls, _pending.refs = [], []
    try:
        yield
        calls, refs = _pending.calls, _pending.refs
    finally:
        _pending.calls = _pending.refs = None
    _run_batch(calls)
    del refs


def _segments(calls: list[tuple[Any, tuple[Any, ...], int]], shares: int) -> list[list[tuple[Any, tuple, int, int]]]:
    """Split the calls' elements into `shares` contiguous runs of about equal size (cut at multiples of 64)."""
    total = sum(numel for _, _, numel in calls)
    target = max(-(-total // shares), 64)
    groups: list[list[tuple[Any, tuple, int, int]]] = [[]]
    room = target
    for kernel, args, numel in calls:
        lo = 0
        while lo < numel:
            if room <= 0 and len(groups) < shares:
                groups.append([])
                room = target
            hi = numel if numel - lo <= room else min(numel, lo + max(64, (room + 63) & ~63))
            groups[-1].append((kernel, args, lo, hi))
            room -= hi - lo
            lo = hi
    return groups


def _run_segments(segments: list[tuple[Any, tuple, int, int]]) -> None:
    for kernel, args, lo, hi in segments:
        kernel(*args, lo, hi)


@functools.cache
def _executor(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hf_sift-kernels")


def _run_batch(calls: list[tuple[Any, tuple[Any, ...], int]]) -> None:
    threads = max(1, torch.get_num_threads())
    if threads == 1 or sum(numel for _, _, numel in calls) < _PARALLEL_MIN:
        _run_segments([(kernel, args, 0, numel) for kernel, args, numel in calls])
        return
    pool = _executor(threads)
    for future in [pool.submit(_run_segments, group) for group in _segments(calls, threads)]:
        future.result()


def _run(kernel: Any, numel: int, *args: Any, refs: tuple[torch.Tensor | None, ...] = ()) -> None:
    """Run ``kernel(*args, start, stop)`` over ``[0, numel)`` on torch's thread count (the GIL is released).

    `refs` are the tensors whose addresses are in `args`: a queued call holds them until it has run.
    """
    if _pending.calls is not None:
        _pending.calls.append((kernel, args, numel))
        _pending.refs.append(refs)
    else:
        _run_batch([(kernel, args, numel)])


def serve_(
    out: torch.Tensor,
    base: torch.Tensor,
    total: torch.Tensor,
    packed_mask: torch.Tensor | None,
    factor: float,
    negate: bool,
) -> bool:
    """Write the served weights of one flat parameter into `out`; `False` (nothing written) if unsupported.

    Computes ``dtype(float64(θ0) + float64(±Q·m) · factor)`` per element, as `hf_sift.served_weights.served_tensor`
    defines it (`negate` selects ``-Q``). `out` may be `base` itself. Supported: CPU, contiguous, `out` and
    `base` of one dtype, float32 or bfloat16.
    """
    kind = _KIND.get(out.dtype)
    if not available() or kind is None or base.dtype != out.dtype or total.dtype != torch.int64:
        return False
    numel = out.numel()
    if base.numel() != numel or total.numel() != numel or not _usable(out, base, total):
        return False
    mask_address = 0
    if packed_mask is not None:
        if packed_mask.dtype != torch.uint8 or packed_mask.numel() != packed_size(numel) or not _usable(packed_mask):
            return False
        mask_address = packed_mask.data_ptr()
    _run(
        _kernels.serve,
        numel,
        kind,
        out.data_ptr(),
        base.data_ptr(),
        total.data_ptr(),
        mask_address,
        float(factor),
        bool(negate),
        refs=(out, base, total, packed_mask),
    )
    return True


def select_(out: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor, packed_mask: torch.Tensor) -> bool:
    """``out = keep`` where the mask bit is set, else ``drop``, bit for bit; `False` (nothing written) if unsupported.

    All three tensors share one dtype; `out` may alias `keep` or `drop`. Supported: CPU, contiguous.
    """
    if not available() or keep.dtype != out.dtype or drop.dtype != out.dtype or out.element_size() not in (1, 2, 4, 8):
        return False
    numel = out.numel()
    if keep.numel() != numel or drop.numel() != numel or not _usable(out, keep, drop, packed_mask):
        return False
    if packed_mask.dtype != torch.uint8 or packed_mask.numel() != packed_size(numel):
        return False
    _run(
        _kernels.select_bits,
        numel,
        out.element_size(),
        out.data_ptr(),
        keep.data_ptr(),
        drop.data_ptr(),
        packed_mask.data_ptr(),
        refs=(out, keep, drop, packed_mask),
    )
    return True

"""Fresh CPU tensors carved from one allocation backed by transparent huge pages.

Serving writes every tuned weight into new memory. The first write to a freshly allocated page faults into the
kernel, and with 4 KiB pages a few hundred MB of weights take hundreds of thousands of faults: on some machines
that costs ten times the arithmetic. One anonymous private mapping advised with ``MADV_HUGEPAGE`` faults in 2 MiB
at a time instead. Where huge pages are not available (other platforms, `HF_SIFT_DISABLE_HUGE_PAGES=1`, or a
small request) the tensors are ordinary `torch.empty` ones; the values are the same either way.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import mmap
import os
import sys
from collections.abc import Iterable, Sequence

import torch


_HUGE_PAGE = 1 << 21
_ALIGN = 64  # every tensor starts on a cache line
_MIN_BYTES = 4 * _HUGE_PAGE  # below this, huge pages save little


def huge_pages_available() -> bool:
    """Whether `empty_tensors` can back its tensors with transparent huge pages here."""
    return (
        hasattr(mmap, "MADV_HUGEPAGE")
        and hasattr(mmap, "MAP_ANONYMOUS")
        and os.environ.get("HF_SIFT_DISABLE_HUGE_PAGES", "") in ("", "0")
    )


def empty_tensors(specs: Sequence[tuple[Sequence[int], torch.dtype]]) -> list[torch.Tensor]:
    """Uninitialised contiguous CPU tensors of the given shapes and dtypes, one per spec, in one allocation.

    The tensors share one storage (disjoint, 64-byte aligned ranges of it), which stays alive while any of them
    does.
    """
    sizes = [torch.Size(shape).numel() * dtype.itemsize for shape, dtype in specs]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // _ALIGN) * _ALIGN
    if total < _MIN_BYTES or not huge_pages_available():
        return [torch.empty(tuple(shape), dtype=dtype) for shape, dtype in specs]
    # Private, not shared: shared anonymous memory is shmem, which huge pages often do not back.
    region = mmap.mmap(-1, total + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # e.g. huge pages compiled out: ordinary pages, same values
        region.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive as long as any view of it
    start = -raw.data_ptr() % _HUGE_PAGE
    return [
        raw[start + offset : start + offset + size].view(dtype).view(tuple(shape))
        for (shape, dtype), offset, size in zip(specs, offsets, sizes)
    ]


def _file_mappings() -> list[tuple[int, int]]:
    """Sorted (start, end) address ranges of this process's file-backed mappings, from /proc/self/maps."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    ranges.sort()
    return ranges


def release_file_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Drop from this process's resident memory the pages of `tensors` that map a file, e.g. a checkpoint that
    transformers memory-mapped; returns the bytes released.

    For tensors that will not be read again, and that were never written: the pages stay in the page cache, and
    a later read would fault the file's bytes back in. Only whole pages inside a tensor's bytes and inside one
    file-backed mapping are released (``MADV_DONTNEED``); anything else (anonymous memory, other platforms) is
    left alone and freed, as usual, when its last reference goes.
    """
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    try:
        mappings = _file_mappings()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    starts = [start for start, _ in mappings]
    page = mmap.PAGESIZE
    released = 0
    for tensor in tensors:
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            continue
        lo = -(-tensor.data_ptr() // page) * page
        hi = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
        index = bisect.bisect_right(starts, lo) - 1
        if hi <= lo or index < 0 or hi > mappings[index][1]:
            continue
        if madvise(lo, hi - lo, mmap.MADV_DONTNEED) == 0:
            released += hi - lo
    return released

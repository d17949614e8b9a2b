"""Huge-page-backed tensors for served weights: layout, lifetime, and the fallback."""

from __future__ import annotations

import gc
import mmap
import sys
from pathlib import Path

import pytest
import torch

from hf_sift import arena


SPECS = [((3, 5), torch.float32), ((7,), torch.bfloat16), ((0,), torch.float32), ((2, 2, 3), torch.float64)]


@pytest.fixture(params=["huge", "ordinary"])
def mode(request, monkeypatch):
    if request.param == "huge":
        if not arena.huge_pages_available():
            pytest.skip("no MADV_HUGEPAGE on this platform")
        monkeypatch.setattr(arena, "_MIN_BYTES", 0)
    else:
        monkeypatch.setenv("HF_SIFT_DISABLE_HUGE_PAGES", "1")
    return request.param


def test_shapes_dtypes_alignment_and_disjoint_ranges(mode):
    tensors = arena.empty_tensors(SPECS)
    assert [(tuple(t.shape), t.dtype) for t in tensors] == [(tuple(s), d) for s, d in SPECS]
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors)
    ranges = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel())
    assert all(end <= start for (_, end), (start, _) in zip(ranges, ranges[1:]))
    if mode == "huge":
        assert all(t.data_ptr() % 64 == 0 for t in tensors)
        assert tensors[0].data_ptr() % (1 << 21) == 0
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1


def test_values_written_are_kept_after_the_others_are_freed(mode):
    tensors = arena.empty_tensors(SPECS)
    for i, t in enumerate(tensors):
        t.fill_(i + 0.5)
    keep = tensors[3]
    del tensors
    gc.collect()
    torch.empty(1 << 20).fill_(7.0)  # reuse freed memory, if any was freed
    assert torch.equal(keep, torch.full((2, 2, 3), 3.5, dtype=torch.float64))


def test_small_requests_use_ordinary_tensors():
    tensors = arena.empty_tensors([((4,), torch.float32), ((4,), torch.float32)])
    assert tensors[0].untyped_storage().data_ptr() != tensors[1].untyped_storage().data_ptr()


def _rss_file() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_release_file_pages_drops_mapped_pages_and_keeps_the_values(tmp_path):
    values = torch.randn(4 << 20, generator=torch.Generator().manual_seed(0))  # 16 MiB
    path = tmp_path / "weights.bin"
    path.write_bytes(values.numpy().tobytes())
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private, like a mapped checkpoint
    tensor = torch.frombuffer(mapped, dtype=torch.float32)[1:]  # not page-aligned at the start
    assert torch.equal(tensor, values[1:])  # every page faulted in
    before = _rss_file()
    released = arena.release_file_pages([tensor])
    page = mmap.PAGESIZE
    assert released == (values.numel() * 4 // page - 1) * page  # whole pages inside the tensor only
    assert before - _rss_file() >= released * 0.9  # resident file pages went down by about that much
    assert torch.equal(tensor, values[1:])  # and read back from the file, unchanged
    anonymous = values.clone()
    assert arena.release_file_pages([anonymous]) == 0  # anonymous memory is never touched
    assert torch.equal(anonymous, values)
    del tensor
    mapped.close()

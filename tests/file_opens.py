"""Which files a block of code opens, seen by the kernel (Linux inotify), so that reads from Rust (safetensors) count."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest


_IN_OPEN = 0x00000020
_IN_NONBLOCK = 0o4000
_EVENT = struct.Struct("iIII")


@contextlib.contextmanager
def files_opened(*folders: Path) -> Iterator[set[str]]:
    """Yield a set that holds, after the block, the paths (under `folders` and their subfolders) opened inside it."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if not hasattr(libc, "inotify_init1"):
        pytest.skip("inotify is not available")
    fd = libc.inotify_init1(_IN_NONBLOCK)
    if fd < 0:
        pytest.skip("inotify is not available")
    watches: dict[int, Path] = {}
    try:
        for folder in folders:
            for sub in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
                wd = libc.inotify_add_watch(fd, os.fsencode(sub), _IN_OPEN)
                if wd < 0:
                    raise OSError(ctypes.get_errno(), f"cannot watch {sub}")
                watches[wd] = sub
        opened: set[str] = set()
        yield opened
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0").decode()
                offset += _EVENT.size + length
                if mask & _IN_OPEN and name:
                    opened.add(str(watches[wd] / name))
    finally:
        os.close(fd)

"""An exclusive lock on a folder that is replaced as a whole, held by writers across their final check and swap.

The lock is a sibling file, ``.<name>.lock``, never a file inside the folder (the folder itself is exchanged by the
swap). It is an OS lock that dies with its holder:

- **POSIX** (Linux, macOS): ``fcntl.flock`` on the lock file. The kernel drops it when the holder exits or is
  killed, so a crashed writer never blocks the next one. The holder deletes the file on release; a waiter that then
  wins the lock on the deleted file sees that the path no longer names it and starts over on the new file, so two
  processes never both believe they hold the lock. A writer killed while holding it leaves the file behind; the
  next writer locks it at once (nobody holds it) and deletes it when done.
- **Network file systems**: Linux maps ``flock`` on NFS to NFS byte-range locks (NFSv4, or NFSv3 with lockd), which
  other clients honour; a mount with ``nolock`` or ``local_lock=flock|all`` (and, depending on the client, SMB/CIFS
  mounts) locks only within one machine. Writers on different machines then serialise only among themselves per
  machine: the compare-and-swap check still catches a change made before it, but not one that lands between the
  check and the swap. Keep writers of one artifact on one machine in that case.
- **Windows** (no ``fcntl``): ``msvcrt.locking`` on the first byte of the lock file, also released by the OS when
  the process dies; the file is left in place (Windows cannot delete an open file).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path


try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of `target` (symlinks resolved): ``.<name>.lock`` beside it."""
    target = Path(target).resolve()
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def folder_lock(target: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock of the folder `target` (which need not exist) for the duration of the block.

    Blocks while another process holds it. See the module docstring for what it does on each platform.

    Example:

    ```python
    with folder_lock("merged"):
        ...  # check the folder's state, then swap the new one into place
    ```
    """
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        with _msvcrt_lock(path):
            yield
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _names_same_file(path, fd):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder we waited for deleted this file: lock the one the path names now
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still held: waiters on this file will start over
        os.close(fd)


def _names_same_file(path: Path, fd: int) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


@contextlib.contextmanager
def _msvcrt_lock(path: Path) -> Iterator[None]:
    import msvcrt

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                break
            except OSError:
                time.sleep(0.01)
        try:
            yield
        finally:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    finally:
        os.close(fd)

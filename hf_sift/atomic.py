"""Atomic replacement of a whole folder.

An artifact is several files that must change together. It is written into a fresh sibling folder, then swapped
into place: on Linux with ``renameat2(RENAME_EXCHANGE)``, a single atomic step, so a crash at any point leaves
either the old or the new artifact; elsewhere with two renames and a short window in which only the backup exists
(it is restored on the next save). Files of the old folder that the new one keeps are hard-linked, not copied.

The swap runs under the folder's lock ([`~hf_sift.folder_lock.folder_lock`]), after an optional precondition that
can refuse it: that is how a save becomes a compare-and-swap (see [`~hf_sift.artifact_state`]).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import stat
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from .folder_lock import folder_lock


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the platform cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    ok = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
    return ok


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def keep_file(src: Path, dst: Path) -> None:
    """Carry a user's file of a folder being rewritten into its staging folder (a sibling): a symbolic link stays
    the same link (it resolves alike from the sibling), any other file is [`link_or_copy`]'d."""
    if os.path.islink(src):
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.readlink(src), dst)
        return
    link_or_copy(src, dst)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (same file system), copying when linking is not possible.

    A symbolic link (the Hugging Face cache's snapshot files are relative links into its blobs) is copied, through
    the link: Linux's link(2) would link the symbolic link itself, which dangles once it sits in another folder, and
    a hard link to the cache's blob would let a later in-place write to `dst` change the cache.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    if os.path.islink(src):
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _umask() -> int:
    """The process's umask (read from /proc where possible: setting it to read it back is not thread-safe)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give a file hf_sift wrote the mode a plain `open()` would (0666 less the umask).

    safetensors creates its files 0600 whatever the umask, so a separate serving user could not read an artifact.
    """
    os.chmod(path, 0o666 & ~_umask())


def _make_stage(target: Path) -> Path:
    """A new empty sibling of `target`, with `target`'s mode if it exists, else the umask's (not mkdtemp's 0700)."""
    while True:
        stage = target.parent / f".{target.name}.staging-{uuid.uuid4().hex[:12]}"
        try:
            os.mkdir(stage, 0o777)  # the umask applies
        except FileExistsError:
            continue
        if target.is_dir():
            os.chmod(stage, stat.S_IMODE(target.stat().st_mode))
        return stage


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, precondition: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `target` atomically, on error it is deleted.

    Args:
        target (`str` or `os.PathLike`): The folder to replace (or create).
        precondition (`Callable[[Path], None]`, *optional*): Called with `target` before staging (to fail early)
            and again under the folder's lock right before the swap; whatever it raises aborts the write and
            leaves `target` as it is. If staging itself fails (e.g. a file to link from `target` vanished), the
            precondition is asked again so that a change of `target` is reported as such.

    Example:

    ```python
    with staged_folder("out") as stage:
        (stage / "a.json").write_text("{}")
    ```
    """
    target = Path(target).resolve()  # through a symlink: replace (and lock) the folder it points to
    target.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(target):
        _recover(target)
    if precondition is not None:
        precondition(target)
    stage = _make_stage(target)
    try:
        try:
            yield stage
        except Exception:  # e.g. an OSError, or a missing file reported as a corrupt artifact
            if precondition is not None:
                precondition(target)  # raises (chained to the failure) if `target` changed meanwhile
            raise
        for root, _, files in os.walk(stage):
            for name in files:
                with open(os.path.join(root, name), "rb+") as f:
                    os.fsync(f.fileno())
        _fsync_dir(stage)
        with folder_lock(target):
            _recover(target)
            if precondition is not None:
                precondition(target)
            _swap_into_place(stage, target)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _backup_path(target: Path) -> Path:
    return target.parent / f".{target.name}.previous"


def _recover(target: Path) -> None:
    """Finish an interrupted non-atomic swap: restore the backup if the target is missing."""
    backup = _backup_path(target)
    if backup.exists():
        if target.exists():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(backup, target)


def _swap_into_place(stage: Path, target: Path) -> None:
    if not target.exists():
        os.rename(stage, target)
    elif not _renameat2_exchange(stage, target):  # (on success `stage` holds the old contents: the caller deletes it)
        backup = _backup_path(target)
        os.rename(target, backup)
        os.rename(stage, target)
        shutil.rmtree(backup)
    _fsync_dir(target.parent)


def write_file_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Write one file through `write(tmp_path)`, then rename it over `path`."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        write(tmp)
        apply_umask(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

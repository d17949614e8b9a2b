"""The digests of a base model's tensors, remembered per process while its files stay the same.

Every format-2 save loads θ0 to write the plain merge P, and checks it against the merge's digests: sha256 over the
tuned parameters (`base_digest`), over the whole state dict (`base_model_digest`), and a BLAKE3 per tensor
(`base_tensor_digests`). Hashing is most of that cost, and a process that saves again and again on one base (a
`train_tasks` run saves after every task, an unlearning run after every removal) would pay it each time. So the
digests are kept in a small per-process cache keyed by the identity of the base's files: the resolved folder, and
for each file in it its device, inode, size and modification and change times (ns). A file rewritten, replaced or
touched changes the key, and the base is hashed again; a base that cannot be tied to files (not found locally) is
never cached.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .digest import digest_tensors, named_tensor_digest, state_dict_digest


# Bases remembered at once (least recently used dropped first); each entry is a few hundred bytes per tensor.
CACHE_SIZE = 4

_cache: OrderedDict[tuple[Any, ...], BaseDigests] = OrderedDict()


class BaseDigests:
    """The digests of one base model's tensors, each computed on first use from the state dict given then.

    The state dict passed to each method must be θ0 as loaded from the files the cache key names.
    """

    def __init__(self) -> None:
        self._tuned: dict[tuple[str, ...], str] = {}
        self._whole: str | None = None
        self._tensors: dict[str, str] | None = None

    def tuned(self, state: Mapping[str, torch.Tensor], names: Sequence[str]) -> str:
        """sha256 of θ0 over `names` (the merge's `base_digest`)."""
        key = tuple(sorted(names))
        if key not in self._tuned:
            self._tuned[key] = digest_tensors(state, key)
        return self._tuned[key]

    def whole(self, state: Mapping[str, torch.Tensor]) -> str:
        """sha256 of every tensor of the state dict (the merge's `base_model_digest`)."""
        if self._whole is None:
            self._whole = state_dict_digest(state)
        return self._whole

    def tensors(self, state: Mapping[str, torch.Tensor]) -> dict[str, str]:
        """The BLAKE3 digest of each tensor, name, dtype and shape included (`base_tensor_digests`)."""
        if self._tensors is None:
            self._tensors = {name: named_tensor_digest(name, tensor) for name, tensor in state.items()}
        return dict(self._tensors)


def files_key(name: str | os.PathLike, revision: str | None, dtype: Any) -> tuple[Any, ...] | None:
    """The identity of the files the base `name` loads from (a folder, or its snapshot in the Hub cache), in
    `dtype`; `None` when they cannot be found locally."""
    folder = Path(name)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(name), revision=revision, local_files_only=True))
        except Exception:  # noqa: BLE001 (not in the cache, not a repo id, offline...: then never cached)
            return None
    entries = []
    for path in sorted(folder.rglob("*")):
        try:
            stat = path.stat()  # follows the Hub cache's links to its blobs
        except OSError:
            return None
        if path.is_file():
            entries.append(
                (
                    path.relative_to(folder).as_posix(),
                    stat.st_dev,
                    stat.st_ino,
                    stat.st_size,
                    stat.st_mtime_ns,
                    stat.st_ctime_ns,
                )  # fmt: skip
            )
    return (str(folder.resolve()), str(dtype), tuple(entries))


def base_digests(key: tuple[Any, ...] | None) -> BaseDigests:
    """The remembered digests of the base whose files have identity `key` (fresh ones for `None`, not kept)."""
    if key is None:
        return BaseDigests()
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    digests = _cache[key] = BaseDigests()
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return digests


def clear() -> None:
    """Forget every remembered base."""
    _cache.clear()

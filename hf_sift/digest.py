"""Canonical sha256 digests of named tensors, and the BLAKE3 per-tensor digests of format 2.

Serialisation (version 1): the tag ``hf_sift-digest-v1\\n``, then for each name in sorted order the JSON line
``["name", "dtype", [shape...]]\\n`` followed by the tensor's raw little-endian bytes in row-major order. The
digest is independent of devices, file layout and sharding.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping

import torch
from blake3 import blake3

from .errors import InvalidArgumentError


_TAG = b"hf_sift-digest-v1\n"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (CPU, contiguous) without a copy when it is already both."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


class TensorDigest:
    """Incremental canonical digest: feed tensors in sorted-name order, read `hexdigest()`."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256(_TAG)
        self._last: str | None = None

    def update(self, name: str, tensor: torch.Tensor) -> None:
        if self._last is not None and name <= self._last:
            raise InvalidArgumentError(
                f"tensors must be digested in sorted name order ({name!r} after {self._last!r})"
            )
        self._last = name
        header = json.dumps([name, _dtype_name(tensor.dtype), list(tensor.shape)]) + "\n"
        self._hash.update(header.encode("utf-8"))
        self._hash.update(tensor_bytes(tensor))

    def hexdigest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def digest_tensors(tensors: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> str:
    """Digest of `tensors` restricted to `names` (default: all)."""
    return digest_lazy(sorted(tensors if names is None else names), tensors.__getitem__)


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Digest of every tensor of a model's state dict: the base model digest of docs/FORMAT.md.

    Tied weights appear under each of their names, as `model.state_dict()` lists them.
    """
    return digest_tensors(state_dict)


def digest_lazy(names: Iterable[str], load: Callable[[str], torch.Tensor]) -> str:
    """Digest of tensors fetched one at a time with `load(name)`, so only one is in memory at once."""
    digest = TensorDigest()
    for name in sorted(names):
        digest.update(name, load(name))
    return digest.hexdigest()


def file_digest(path: str) -> str:
    """sha256 of a file's bytes, read in blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            sha.update(block)
    return "sha256:" + sha.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """`"blake3:" + hex` of a tensor's raw little-endian bytes in row-major order (see docs/FORMAT.md)."""
    return "blake3:" + blake3(tensor_bytes(tensor)).hexdigest()


def named_tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """`"blake3:" + hex` of the JSON line `["<name>", "<dtype>", [<shape>]]\n` then the tensor's raw bytes."""
    header = json.dumps([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]) + "\n"
    hasher = blake3(header.encode("utf-8"))
    hasher.update(tensor_bytes(tensor))
    return "blake3:" + hasher.hexdigest()

"""A private store of each task's exact task vector, so that a task can be unlearned without replaying its training.

A replay is exact only on the environment that trained the task; a stored q_t removes that dependence, at the
cost of disk space and of keeping, privately, a function of the task's data. **Never publish a store**: it is
refused inside an artifact folder (whose other files a save keeps and an upload publishes).

One file per task, `<task_id>.safetensors`, compressed without loss:

- the low bits that every entry of a tensor of q has at zero are dropped (a weight's update is a multiple of its
  ulp, which for most weights is far above 2**-S), and the rest is stored in whichever of int8, int16,
  bfloat16 (the updates of 16-bit weights have few significant bits), int32, float32 or int64 takes the fewest
  bytes, the few entries it cannot hold exactly kept aside with their index;
- where that is smaller, only the nonzero entries are stored, in row-major order, with a packed bitmap of where
  they are (SIFT-trained task vectors are zero outside their mask, so that bitmap is the mask);
- the mask is stored only where it differs from the bitmap of the nonzero entries.

The file's single metadata entry holds the sign seed, S, the base digest, the task digest, the digest of the
packed masks, the task's metadata and record. [`TaskVectorStore.get`] rebuilds the [`~hf_sift.TaskVector`] and
checks both digests. See docs/FORMAT.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .artifact import CONFIG_NAME
from .atomic import write_file_atomic
from .digest import digest_tensors
from .errors import (
    CorruptArtifactError,
    DuplicateTaskError,
    TaskDigestMismatchError,
    TaskVectorStoreError,
    UnknownTaskError,
)
from .masks import pack_bits, packed_size, unpack_bits
from .task_id import validate_task_id
from .task_vector import TaskVector


STORE_FORMAT_VERSION = 1
_METADATA_KEY = "hf_sift_task_vector"
# Candidate storage dtypes. A float dtype holds an entry only where it does so exactly: the update of a bfloat16
# weight has at most 8 significant bits within a binade, so its q fits in 2 bytes as a float however large it is,
# where an integer would need 4.
_WIDTHS = (torch.int8, torch.int16, torch.bfloat16, torch.int32, torch.float32, torch.int64)
# Bytes an entry costs when no candidate holds it and it is kept aside, exactly: its index and value, both int64.
_OUTLIER_BYTES = 16


def _holds(dtype: torch.dtype, values: torch.Tensor) -> torch.Tensor:
    """Where `dtype` holds the int64 entries of `values` exactly."""
    if not dtype.is_floating_point:
        return (values >= torch.iinfo(dtype).min) & (values <= torch.iinfo(dtype).max)
    # |q| < 2**63 is finite in both float dtypes, and a float that rounds to ±2**63 never converts back equal.
    return values.to(dtype).to(torch.int64) == values


def _narrowest(values: torch.Tensor) -> tuple[torch.dtype, torch.Tensor]:
    """The dtype of `_WIDTHS` storing `values` in the fewest bytes, the few entries it cannot hold kept aside as
    outliers; returns it and where it holds the entries. Ties go to the earlier dtype."""
    best, best_cost = (torch.int64, torch.ones_like(values, dtype=torch.bool)), float("inf")
    for dtype in _WIDTHS:  # by size: once the best costs no more than this size alone, nothing after can win
        if values.numel() * dtype.itemsize >= best_cost:
            break
        holds = _holds(dtype, values) if dtype != torch.int64 else torch.ones_like(values, dtype=torch.bool)
        cost = values.numel() * dtype.itemsize + int((~holds).sum()) * _OUTLIER_BYTES
        if cost < best_cost:
            best, best_cost = (dtype, holds), cost
    return best


def _common_shift(nonzero: torch.Tensor) -> int:
    """The largest k such that every (nonzero) entry is a multiple of 2**k."""
    if nonzero.numel() == 0:
        return 0
    lowest = nonzero & -nonzero  # the lowest set bit of each entry; -2**63 maps to itself, a multiple of 2**63
    lowest = lowest[lowest > 0]
    return int(lowest.min()).bit_length() - 1 if lowest.numel() else 63


def _encode(q: torch.Tensor, packed_mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The stored tensors of one parameter, and how to decode them."""
    flat = q.detach().cpu().reshape(-1)
    support = flat != 0
    nonzero = flat[support]
    # q = round(τ · 2**S) of float weights: near a weight of magnitude 2**e, τ is a multiple of its ulp, so q's low
    # bits are zero wherever S exceeds the ulp's exponent; dropping the bits every entry shares is lossless.
    shift = _common_shift(nonzero)
    if shift:
        nonzero = nonzero >> shift
    width, holds = _narrowest(nonzero)
    tensors: dict[str, torch.Tensor] = {}
    if nonzero.numel() * width.itemsize + packed_size(flat.numel()) < flat.numel() * width.itemsize:
        values, encoding = nonzero, "sparse"
        tensors["support"] = pack_bits(support)
    else:  # zeros fit every dtype: the same entries are outliers
        values, encoding = flat >> shift, "dense"
        holds = torch.ones_like(flat, dtype=torch.bool).masked_scatter_(support, holds)
    outliers = (~holds).nonzero().reshape(-1)
    tensors["values"] = values.masked_fill(~holds, 0).to(width)
    if outliers.numel():
        tensors["outlier_index"] = outliers
        tensors["outlier_value"] = values[outliers]
    mask = packed_mask.detach().cpu()
    mask_is_support = torch.equal(mask, tensors["support"] if encoding == "sparse" else pack_bits(support))
    if not mask_is_support:
        tensors["mask"] = mask
    layout = {"shape": list(q.shape), "encoding": encoding, "shift": shift, "outliers": int(outliers.numel())}
    return tensors, {**layout, "mask": "support" if mask_is_support else "stored"}


class TaskVectorStore:
    """A folder of exact task vectors, one losslessly compressed safetensors file per task.

    Args:
        directory (`str` or `os.PathLike`): The store's folder (created on the first [`put`]). It must not lie
            inside an artifact folder.

    Example:

    ```python
    >>> store = TaskVectorStore("private/task_vectors")
    >>> store.put("alice", task_vector)
    >>> delta.remove("alice", store.get("alice", expected_digest=delta.record("alice")["digest"]))
    ```
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).absolute()
        for folder in (self.directory, *self.directory.parents):
            if (folder / CONFIG_NAME).is_file():
                raise TaskVectorStoreError(
                    f"{self.directory} lies inside the artifact {folder}: a store must never be published; "
                    "keep it outside every artifact folder"
                )

    def __repr__(self) -> str:
        return f"TaskVectorStore({str(self.directory)!r}, tasks={len(self.task_ids)})"

    def path(self, task_id: str) -> Path:
        """The file holding `task_id`'s task vector."""
        return self.directory / f"{validate_task_id(task_id)}.safetensors"

    @property
    def task_ids(self) -> list[str]:
        """Sorted ids of the stored tasks."""
        if not self.directory.is_dir():
            return []
        return sorted(p.name.removesuffix(".safetensors") for p in self.directory.glob("[!.]*.safetensors"))

    def __contains__(self, task_id: object) -> bool:
        return isinstance(task_id, str) and self.path(task_id).is_file()

    def __iter__(self) -> Iterator[str]:
        return iter(self.task_ids)

    def __len__(self) -> int:
        return len(self.task_ids)

    def nbytes(self, task_id: str) -> int:
        """Size on disk of one stored task vector."""
        return self._existing(task_id).stat().st_size

    def _existing(self, task_id: str) -> Path:
        path = self.path(task_id)
        if not path.is_file():
            raise UnknownTaskError(f"task {task_id!r} is not in the task-vector store {self.directory}")
        return path

    def put(self, task_id: str, task_vector: TaskVector, *, record: Mapping[str, Any] | None = None) -> int:
        """Store `task_vector` under `task_id` (atomically) and return the file's size in bytes.

        Storing the same task vector again writes nothing.

        Args:
            task_id (`str`): The task's id.
            task_vector ([`~hf_sift.TaskVector`]): Its exact task vector.
            record (`dict`, *optional*): The task's manifest record, kept with it (JSON-serialisable).

        Raises:
            [`~hf_sift.errors.DuplicateTaskError`] when another task vector is already stored under `task_id`.
        """
        path = self.path(task_id)
        if path.is_file():
            stored = self._header(path)["digest"]
            if stored != task_vector.digest:
                raise DuplicateTaskError(
                    f"{path} already holds another task vector for {task_id!r} (digest {stored}); discard it first"
                )
            return path.stat().st_size
        tensors: dict[str, torch.Tensor] = {}
        layout: dict[str, Any] = {}
        for name in task_vector.names:
            encoded, layout[name] = _encode(task_vector.q[name], task_vector.packed_masks[name])
            tensors.update({f"{kind}/{name}": t.contiguous() for kind, t in encoded.items()})
        header = {
            "format_version": STORE_FORMAT_VERSION,
            "task_id": task_id,
            "sign_seed": task_vector.sign_seed,
            "scale_bits": task_vector.scale_bits,
            "base_digest": task_vector.base_digest,
            "digest": task_vector.digest,
            "mask_digest": digest_tensors(task_vector.packed_masks),
            "metadata": task_vector.metadata,
            "record": None if record is None else dict(record),
            "tensors": layout,
        }
        text = json.dumps(header, sort_keys=True, ensure_ascii=False)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)  # private: only its owner reads it
        write_file_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={_METADATA_KEY: text}))
        return path.stat().st_size

    def _header(self, path: Path) -> dict[str, Any]:
        try:
            with safe_open(path, framework="pt") as f:
                header = json.loads((f.metadata() or {})[_METADATA_KEY])
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            raise CorruptArtifactError(f"cannot read the stored task vector {path}: {err}") from None
        if not isinstance(header, dict) or header.get("format_version") != STORE_FORMAT_VERSION:
            raise CorruptArtifactError(f"{path} is not a task vector of store format {STORE_FORMAT_VERSION}")
        return header

    def record(self, task_id: str) -> dict[str, Any] | None:
        """The manifest record stored with a task (None if none was given)."""
        return self._header(self._existing(task_id))["record"]

    def get(self, task_id: str, expected_digest: str | None = None) -> TaskVector:
        """Rebuild a stored task vector exactly, checking its digest and its masks' digest.

        Args:
            task_id (`str`): The task's id.
            expected_digest (`str`, *optional*): The digest it must have (e.g. the one an artifact's manifest
                records for the task).

        Raises:
            [`~hf_sift.errors.UnknownTaskError`], [`~hf_sift.errors.CorruptArtifactError`] (naming the file) when
            it cannot be read or does not match its own digests, [`~hf_sift.errors.TaskDigestMismatchError`] when
            it is not the task vector `expected_digest` names.
        """
        path = self._existing(task_id)
        header = self._header(path)
        if expected_digest is not None and header["digest"] != expected_digest:
            raise TaskDigestMismatchError(
                f"{path} holds a task vector with digest {header['digest']}, not the expected {expected_digest}"
            )
        q, masks = {}, {}
        try:
            with safe_open(path, framework="pt") as f:
                for name, layout in header["tensors"].items():
                    q[name], masks[name] = _decode(f, name, layout)
        except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CorruptArtifactError(f"cannot read the stored task vector {path}: {err}") from None
        vector = TaskVector(
            q=q,
            packed_masks=masks,
            sign_seed=header["sign_seed"],
            scale_bits=header["scale_bits"],
            base_digest=header["base_digest"],
            metadata=header["metadata"],
        )
        if vector.digest != header["digest"] or digest_tensors(masks) != header["mask_digest"]:
            raise CorruptArtifactError(f"the stored task vector {path} does not match its recorded digests")
        return vector

    def discard(self, task_id: str) -> None:
        """Delete a stored task vector (e.g. once its task is unlearned, so that no trace of its data remains)."""
        self._existing(task_id).unlink()


def _decode(f: Any, name: str, layout: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """q and the packed mask of one parameter (a malformed file raises; [`TaskVectorStore.get`] names it)."""
    shape = tuple(int(d) for d in layout["shape"])
    numel = 1
    for dim in shape:
        numel *= dim
    values = f.get_tensor(f"values/{name}")
    if values.dtype not in _WIDTHS:
        raise CorruptArtifactError(f"values of {name!r} are {values.dtype}")
    shift = int(layout["shift"])
    if not 0 <= shift <= 63:
        raise CorruptArtifactError(f"invalid shift {shift} of {name!r}")
    values = values.to(torch.int64)
    if int(layout["outliers"]):
        index, exact = f.get_tensor(f"outlier_index/{name}"), f.get_tensor(f"outlier_value/{name}")
        if index.dtype != torch.int64 or exact.dtype != torch.int64 or index.numel() != int(layout["outliers"]):
            raise CorruptArtifactError(f"malformed outliers of {name!r}")
        values[index] = exact
    values <<= shift
    if layout["encoding"] == "dense":
        q = values.reshape(shape)
    elif layout["encoding"] == "sparse":
        support = f.get_tensor(f"support/{name}")
        where = unpack_bits(support, numel)
        flat = torch.zeros(numel, dtype=torch.int64)
        flat[where] = values
        q = flat.view(shape)
    else:
        raise CorruptArtifactError(f"unknown encoding {layout['encoding']!r} of {name!r}")
    if layout["mask"] == "support":
        mask = pack_bits(q != 0) if layout["encoding"] == "dense" else f.get_tensor(f"support/{name}")
    else:
        mask = f.get_tensor(f"mask/{name}")
    if mask.dtype != torch.uint8 or tuple(mask.shape) != (packed_size(numel),):
        raise CorruptArtifactError(f"the mask of {name!r} has the wrong packed layout")
    return q, mask

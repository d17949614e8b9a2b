"""Tensor-by-tensor reading and writing of safetensors checkpoints.

[`CheckpointReader`] opens a transformers checkpoint folder (one `model.safetensors`, or shards listed by
`model.safetensors.index.json`) and reads one tensor at a time, so merging N models holds a few tensors in memory
rather than N models. Each read opens the shard, copies the tensor out and closes it again: the memory map never
accumulates pages of tensors already merged.

[`StreamingCheckpointWriter`] writes a checkpoint whose tensor names, shapes and dtypes are known up front: the
shard plan comes from `huggingface_hub.split_torch_state_dict_into_shards` (on meta tensors), each shard's
safetensors header is written first and each tensor's bytes are appended as it is produced.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.constants import SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE, SAFETENSORS_WEIGHTS_FILE_PATTERN
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError, ParameterMismatchError, PathNotFoundError
from ..shard_size import DEFAULT_MAX_SHARD_SIZE


# safetensors dtype codes (https://github.com/huggingface/safetensors, format spec).
_DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}

# Tied weights that `save_pretrained` drops: the missing name is read from its source.
TIED_ALIASES: dict[str, tuple[str, ...]] = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight"),
}


class CheckpointReader:
    """Lazy reader of one safetensors checkpoint: a file, or a folder with one file or an index of shards.

    Args:
        path (`str` or `os.PathLike`): The checkpoint folder (or a single `.safetensors` file).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise PathNotFoundError(f"checkpoint {str(path)!r}: no such folder or file")
        if self.path.is_file():
            self.folder = self.path.parent
            files = {self.path.name: self.path}
            weight_map = None
        elif (self.path / SAFETENSORS_INDEX_FILE).is_file():
            self.folder = self.path
            try:
                weight_map = json.loads((self.path / SAFETENSORS_INDEX_FILE).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"cannot read the shard index of {self.path}: {err}") from None
            files = {f: self.path / f for f in sorted(set(weight_map.values()))}
        elif (self.path / SAFETENSORS_SINGLE_FILE).is_file():
            self.folder = self.path
            files = {SAFETENSORS_SINGLE_FILE: self.path / SAFETENSORS_SINGLE_FILE}
            weight_map = None
        else:
            raise CheckpointError(f"{self.path} holds no model.safetensors nor {SAFETENSORS_INDEX_FILE}")
        self._location: dict[str, Path] = {}
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for filename, file in files.items():
            if not file.is_file():
                raise CheckpointError(f"shard {file} of {self.path} is missing")
            try:
                with safe_open(file, framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                        if weight_map is not None and weight_map.get(name) != filename:
                            continue
                        piece = handle.get_slice(name)
                        self._location[name] = file
                        self._specs[name] = (tuple(piece.get_shape()), _CODE_DTYPES.get(piece.get_dtype()))
            except (OSError, RuntimeError, SafetensorError) as err:
                raise CheckpointError(f"cannot read {file} (truncated or not a safetensors file?): {err}") from None
        self.config: dict[str, Any] | None = None
        if (self.folder / "config.json").is_file():
            try:
                self.config = json.loads((self.folder / "config.json").read_text())
            except (OSError, ValueError) as err:
                raise CheckpointError(f"cannot read {self.folder / 'config.json'}: {err}") from None

    def names(self) -> list[str]:
        """Names of the stored tensors, in file order."""
        return list(self._location)

    def __contains__(self, name: object) -> bool:
        return name in self._location or self._alias(name) is not None

    def _alias(self, name: object) -> str | None:
        for alias in TIED_ALIASES.get(name, ()) if isinstance(name, str) else ():
            if alias in self._location:
                return alias
        return None

    def _resolve(self, name: str) -> str:
        if name in self._location:
            return name
        alias = self._alias(name)
        if alias is None:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        return alias

    def shape(self, name: str) -> tuple[int, ...]:
        return self._specs[self._resolve(name)][0]

    def dtype(self, name: str) -> torch.dtype | None:
        """The tensor's dtype (None for a dtype torch cannot hold)."""
        return self._specs[self._resolve(name)][1]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a tied weight missing from the file is read from its source)."""
        name = self._resolve(name)
        try:
            with safe_open(self._location[name], framework="pt") as handle:
                return handle.get_tensor(name)
        except (OSError, RuntimeError, SafetensorError) as err:
            raise CheckpointError(f"cannot read {name!r} from {self._location[name]}: {err}") from None

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, tensors={len(self._location)})"


def _header(specs: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape, dtype in specs:
        size = dtype.itemsize
        for dim in shape:
            size *= dim
        header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


class StreamingCheckpointWriter:
    """Write a (possibly sharded) safetensors checkpoint one tensor at a time.

    Tensors must be written in the order of [`order`]; each is checked against its declared shape and dtype.
    Call [`close`] to write the shard index (when sharded).

    Args:
        directory (`str` or `os.PathLike`): An existing folder to write into.
        specs (`Mapping[str, tuple[tuple[int, ...], torch.dtype]]`): Name -> (shape, dtype) of every tensor.
        max_shard_size (`int` or `str`, *optional*, defaults to `"2GB"`): Largest shard before splitting.
        metadata (`Mapping[str, str]`, *optional*): Extra `__metadata__` of each file (`format: pt` is added).
        filename_pattern (`str`, *optional*): Shard file name pattern, as in `huggingface_hub`.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        metadata: Mapping[str, str] | None = None,
        filename_pattern: str = SAFETENSORS_WEIGHTS_FILE_PATTERN,
    ):
        for name, (_, dtype) in specs.items():
            if dtype not in _DTYPE_CODES:
                raise CheckpointError(f"cannot write {name!r}: dtype {dtype} has no safetensors code here")
        self.directory = Path(directory)
        self.specs = {n: (tuple(shape), dtype) for n, (shape, dtype) in specs.items()}
        self.filename_pattern = filename_pattern
        meta = {n: torch.empty(s, dtype=d, device="meta") for n, (s, d) in self.specs.items()}
        self.split = split_torch_state_dict_into_shards(
            meta, filename_pattern=filename_pattern, max_shard_size=max_shard_size
        )
        self.metadata = {"format": "pt", **dict(metadata or {})}
        self.order = [n for f in self.split.filename_to_tensors.values() for n in f]
        self._next = 0
        self._file = None
        self._file_end: str | None = None

    def _open_next_file(self, name: str) -> None:
        filename = self.split.tensor_to_filename[name]
        names = self.split.filename_to_tensors[filename]
        self._file = open(self.directory / filename, "wb")  # noqa: SIM115 (closed in write/close)
        self._file.write(_header([(n, *self.specs[n]) for n in names], self.metadata))
        self._file_end = names[-1]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor (it must be `order[i]` for the i-th call, with its declared shape and dtype)."""
        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise ParameterMismatchError(f"the writer expected {expected!r}, got {name!r}")
        shape, dtype = self.specs[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ParameterMismatchError(
                f"{name!r}: got {tuple(tensor.shape)} {tensor.dtype}, declared {shape} {dtype}"
            )
        if self._file is None:
            self._open_next_file(name)
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            self._file.write(memoryview(flat.view(torch.uint8).numpy()))
        self._next += 1
        if name == self._file_end:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Finish the checkpoint: every tensor must have been written; writes the index when sharded."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._next != len(self.order):
            raise ParameterMismatchError(f"{len(self.order) - self._next} tensor(s) were never written")
        if self.split.is_sharded:
            index = {"metadata": dict(self.split.metadata), "weight_map": self.split.tensor_to_filename}
            index_name = self.filename_pattern.format(suffix="") + ".index.json"
            (self.directory / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        """Close an open file after an error (the staging folder holding it is discarded by the caller)."""
        if self._file is not None:
            self._file.close()
            self._file = None

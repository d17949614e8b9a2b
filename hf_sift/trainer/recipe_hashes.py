"""What a recipe hashes, at each recipe version: the saved files of a tokenizer or processor, a collator's attributes
and the task's rows.

- Version 1 hashed every byte a tokenizer or processor saves, load-time flags included, and the rows with the Arrow
  schema's metadata (the `datasets` features and, after a `map`, its cache fingerprint).
- Version 2 hashes content only: saved configs without the load-time flags of [`PROVENANCE_FIELDS`], plus what a
  tokenizer reads when called ([`CALL_ATTRIBUTES`]); the rows by column names, Arrow types and values, without the
  schema's metadata.

Each function takes the `version` to hash as, so a recipe recorded at version 1 is compared with the current run's
hashes computed the version-1 way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import types
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from ..errors import ReplayPreconditionError


RECIPE_VERSION = 3


# Keys `from_pretrained` adds to a tokenizer's (or processor's) init kwargs from *how* it was loaded, which
# `save_pretrained` then writes into its `*config.json`. They say nothing about what the object computes, and differ
# between two loads of the same files, so version-2 identities leave them out:
PROVENANCE_FIELDS = frozenset(
    {
        # Whether the name given was a local folder (True) or a Hub repo id (False): the same files give True when
        # trained from a folder and False when loaded from the Hub, as `hf-sift unlearn REPO_ID` does.
        "is_local",
        # Whether the load was offline (`local_files_only=True`, or `HF_HUB_OFFLINE=1`, which forces it).
        "local_files_only",
        # The folder or repo id loaded from (transformers pops it before saving; older versions did not always).
        "name_or_path",
        # The commit the files were resolved to (older transformers kept it in init kwargs).
        "_commit_hash",
        # Where the cache lives, and whether a download was forced: where the files came from, not what they hold.
        "cache_dir",
        "force_download",
    }
)


def jsonable(value: Any, version: int = RECIPE_VERSION) -> Any:
    """`value` as plain JSON data (sets sorted, enums by value, unknown objects by their type's name); objects with
    `save_pretrained` (a collator's tokenizer) by their [`object_identity`] at `version`."""
    if isinstance(value, Enum):
        return jsonable(value.value, version)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v, version) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (set, frozenset)):
        return sorted(jsonable(v, version) for v in value)
    if isinstance(value, (list, tuple)):
        return [jsonable(v, version) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, version)
    if hasattr(value, "save_pretrained"):
        return object_identity(value, version=version)
    if isinstance(value, torch.dtype):
        return str(value)
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def sha256_json(data: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def saved_file_bytes(path: Path) -> bytes:
    """A saved file's bytes; in a fast tokenizer's `tokenizer.json`, without the truncation and padding state.

    A fast tokenizer keeps the truncation and padding of its last call and saves them: two copies of one tokenizer
    would otherwise hash differently after being called differently (or a dataset map was read from its cache).
    """
    data = path.read_bytes()
    if path.name != "tokenizer.json":
        return data
    try:
        saved = json.loads(data)
    except ValueError:
        return data
    if isinstance(saved, dict):
        saved.pop("truncation", None)
        saved.pop("padding", None)
    return json.dumps(saved, sort_keys=True).encode()


def saved_content_bytes(path: Path) -> bytes:
    """[`saved_file_bytes`], and in a saved `*config.json` without the keys of [`PROVENANCE_FIELDS`].

    The keys are dropped at the top level and in the configs nested one level down (a processor's
    `processor_config.json` holds its image or audio processor's). Vocabularies (`tokenizer.json`, `vocab.json`,
    `added_tokens.json`) are never edited: a token may be spelled like one of these keys.
    """
    data = saved_file_bytes(path)
    if not path.name.endswith("config.json"):
        return data
    try:
        saved = json.loads(data)
    except ValueError:
        return data
    if not isinstance(saved, dict):
        return data
    saved = {key: value for key, value in saved.items() if key not in PROVENANCE_FIELDS}
    for key, value in saved.items():
        if isinstance(value, dict):
            saved[key] = {k: v for k, v in value.items() if k not in PROVENANCE_FIELDS}
    return json.dumps(saved, sort_keys=True).encode()


# What a tokenizer reads when called (padding a batch, truncating) that `save_pretrained` writes only when it was an
# init argument: set on a loaded tokenizer (`tokenizer.padding_side = "left"`), it changes the batches, not the files.
CALL_ATTRIBUTES = ("padding_side", "truncation_side", "model_input_names")


def _call_attributes(obj: Any) -> dict[str, Any]:
    """The [`CALL_ATTRIBUTES`] of a tokenizer, or of a processor's tokenizer (`"tokenizer.padding_side"`)."""
    found = {}
    for prefix, holder in (("", obj), ("tokenizer.", getattr(obj, "tokenizer", None))):
        for name in CALL_ATTRIBUTES:
            value = getattr(holder, name, None)
            if isinstance(value, (str, list, tuple)):
                found[prefix + name] = jsonable(value)
    return found


def check_version(version: int | None) -> int:
    """`version`, or the current `RECIPE_VERSION` for None; refuses a version this hf_sift cannot hash as."""
    if version is None:
        return RECIPE_VERSION
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= RECIPE_VERSION:
        raise ReplayPreconditionError(
            f"recipe version {version!r} is not one this hf_sift reads (1 to {RECIPE_VERSION}): upgrade"
        )
    return version


def object_identity(obj: Any, *, version: int | None = None) -> dict[str, str] | None:
    """Class and content hash of a collator, tokenizer or processor (None for None).

    Objects with `save_pretrained` (tokenizers, processors) are hashed through the files they save; functions by
    their qualified name; other objects (collators) through their attributes, nested tokenizers by their own hash.

    Args:
        obj: The collator, tokenizer or processor.
        version (`int`, *optional*, defaults to `RECIPE_VERSION`): The recipe version to hash as. From version 2 the
            saved configs are hashed without the load-time keys of [`PROVENANCE_FIELDS`] (a tokenizer loaded from a
            folder and the same one loaded from the Hub are equal); version 1 hashes every saved byte, as recipes of
            version 1 recorded it.
    """
    version = check_version(version)
    if obj is None:
        return None
    file_bytes = saved_file_bytes if version == 1 else saved_content_bytes
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return {"class": f"{obj.__module__}.{obj.__qualname__}", "hash": "function"}
    cls = type(obj)
    identity = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    if hasattr(obj, "save_pretrained"):
        digest = hashlib.sha256()
        with tempfile.TemporaryDirectory() as folder:
            obj.save_pretrained(folder)
            for path in sorted(Path(folder).rglob("*")):
                if path.is_file():
                    digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
                    digest.update(hashlib.sha256(file_bytes(path)).digest())
        if version >= 2:
            digest.update(b"\0call attributes\0" + json.dumps(_call_attributes(obj), sort_keys=True).encode())
        identity["hash"] = "sha256:" + digest.hexdigest()
    else:
        state = vars(obj) if hasattr(obj, "__dict__") else {}
        data = jsonable({k: v for k, v in state.items() if not k.startswith("_")}, version)
        identity["hash"] = sha256_json(data)
    return identity


def rows_digest(dataset: Any, *, version: int | None = None) -> str:
    """sha256 over the task's rows, in order, every column (their Arrow serialisation).

    Args:
        dataset (`datasets.Dataset`): The task's rows.
        version (`int`, *optional*, defaults to `RECIPE_VERSION`): The recipe version to hash as. From version 3
            the rows are copied into fresh Arrow buffers first (`take`), so the digest does not depend on where they
            sit: the rows of the first task of a dataset are a slice whose buffers run on into the next tasks' rows,
            and the Arrow stream of such a slice carries them, so adding or deleting another task's rows changed
            it. From version 2 only the rows count: column names, Arrow types and values, without the schema's
            metadata (where `datasets` keeps its features and, after a `map`, a cache fingerprint that differs for
            equal rows built another way). Version 1 hashes the schema with its metadata, as recipes of version 1
            recorded it.
    """
    import pyarrow as pa

    version = check_version(version)
    table = dataset.with_format("arrow")[:] if hasattr(dataset, "with_format") else None
    if table is None:
        raise ReplayPreconditionError("the training data must be a `datasets.Dataset` to be recorded for replay")
    table = table.combine_chunks()
    if version >= 3:
        table = table.take(pa.array(range(table.num_rows), type=pa.int64()))
    if version >= 2:
        table = table.cast(pa.schema([f.remove_metadata() for f in table.schema]))
    digest = _HashingSink()
    with pa.PythonFile(digest, mode="w") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)  # the stream goes into the hash as it is written, never held whole
    return "sha256:" + digest.hexdigest()


class _HashingSink:
    """A write-only file object that feeds what is written to sha256 (for `pyarrow.PythonFile`)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._hash.update(view)
        return view.nbytes

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


__all__ = [
    "CALL_ATTRIBUTES",
    "PROVENANCE_FIELDS",
    "RECIPE_VERSION",
    "check_version",
    "jsonable",
    "object_identity",
    "rows_digest",
    "saved_content_bytes",
    "saved_file_bytes",
    "sha256_json",
]

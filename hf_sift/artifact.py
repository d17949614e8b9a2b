"""The on-disk layout of a merged SIFT artifact (a folder now, a Hub repo later). See docs/FORMAT.md.

```
sift_config.json                     format version, base digest, sign seed, S, tuned parameters, T, delta digest
sift_manifest.json                   one record per task: digest, mask digest, density, element counts, metadata
sift_delta.safetensors               the int64 sum Q (or sift_delta-0000i-of-0000n.safetensors + index)
masks/<task_id>.safetensors          one bit-packed mask per task
config.json, model.safetensors, ...  format 2: the plain merge P as a transformers checkpoint (see plain_merge.py)
sift_unlearning_log.jsonl            the unlearning log (only once a task was unlearned), see unlearning_log.py
```
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from .artifact_config import CONFIG_NAME, MANIFEST_NAME, ArtifactConfig, validate_record
from .artifact_config import FORMAT_VERSION as FORMAT_VERSION
from .artifact_state import ArtifactState
from .atomic import apply_umask, keep_file, link_or_copy, staged_folder
from .digest import file_digest
from .errors import CorruptArtifactError, PathNotFoundError
from .masks import packed_size
from .plain_merge import is_plain_file
from .shard_size import DEFAULT_MAX_SHARD_SIZE
from .task_id import validate_task_id
from .unlearning_log import LOG_NAME


DELTA_NAME = "sift_delta.safetensors"
DELTA_INDEX_NAME = "sift_delta.safetensors.index.json"
DELTA_PATTERN = "sift_delta{suffix}.safetensors"
MASKS_DIR = "masks"


def mask_filename(task_id: str) -> str:
    """Path of a task's mask inside the artifact, relative to its root."""
    return f"{MASKS_DIR}/{validate_task_id(task_id)}.safetensors"


def is_artifact_file(relative_path: str) -> bool:
    """Whether a file belongs to the SIFT artifact (and is rewritten by a save) rather than to the user."""
    name = relative_path.replace(os.sep, "/")
    return (
        name in (CONFIG_NAME, MANIFEST_NAME, DELTA_INDEX_NAME, LOG_NAME)
        or (name.startswith("sift_delta") and name.endswith(".safetensors"))
        or name.startswith(MASKS_DIR + "/")
        or is_plain_file(name)
    )


def _dump_json(data: Any, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptArtifactError(f"{path.name} is missing from {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptArtifactError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CorruptArtifactError(f"{path} does not hold a JSON object")
    return data


def read_config(folder: str | os.PathLike) -> ArtifactConfig:
    """Read and check `sift_config.json` (every field typed and range-checked; unknown keys dropped with a warning).

    Raises:
        [`~hf_sift.errors.CorruptArtifactError`] naming a missing or malformed field, or
        [`~hf_sift.errors.IncompatibleArtifactError`] for a newer format version.
    """
    path = Path(folder) / CONFIG_NAME
    return ArtifactConfig.from_dict(_read_json(path), source=str(path))


def read_manifest(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read `sift_manifest.json`: task id -> record, each record checked field by field."""
    path = Path(folder) / MANIFEST_NAME
    tasks = _read_json(path).get("tasks")
    if not isinstance(tasks, dict):
        raise CorruptArtifactError(f"{path} has no 'tasks' object")
    return {validate_task_id(t): validate_record(t, r, str(path)) for t, r in tasks.items()}


def read_artifact(folder: str | os.PathLike) -> tuple[ArtifactConfig, dict[str, dict[str, Any]]]:
    """Read the config and the manifest, and check them against each other and against the binding digest.

    Raises:
        [`~hf_sift.errors.CorruptArtifactError`] if a field is malformed, T differs from the manifest's task count,
        or a field bound by `binding_digest` was edited; [`~hf_sift.errors.IncompatibleArtifactError`];
        [`~hf_sift.errors.PathNotFoundError`] if `folder` does not exist.
    """
    if not Path(folder).is_dir():
        what = "is not a folder" if Path(folder).exists() else "does not exist"
        raise PathNotFoundError(f"the artifact folder {folder} {what}")
    config = read_config(folder)
    records = read_manifest(folder)
    if config.num_tasks != len(records):
        raise CorruptArtifactError(
            f"{Path(folder) / CONFIG_NAME}: field 'num_tasks' says {config.num_tasks} tasks, "
            f"{MANIFEST_NAME} lists {len(records)}"
        )
    config.check_binding(records, str(Path(folder) / CONFIG_NAME))
    return config, records


def delta_files(folder: str | os.PathLike) -> dict[str, list[str]]:
    """Map each file holding part of the sum Q to the tensor names it holds."""
    folder = Path(folder)
    index = folder / DELTA_INDEX_NAME
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CorruptArtifactError(f"{index} has no 'weight_map'")
        files: dict[str, list[str]] = {}
        for name, filename in weight_map.items():
            if Path(filename).name != filename:
                raise CorruptArtifactError(f"{index} names a file outside the artifact: {filename!r}")
            files.setdefault(filename, []).append(name)
        return files
    if not (folder / DELTA_NAME).exists():
        raise CorruptArtifactError(f"{DELTA_NAME} is missing from {folder}")
    return {DELTA_NAME: []}  # names are read from the file itself


def iter_delta(folder: str | os.PathLike, shapes: Mapping[str, tuple[int, ...]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the tensors of Q one at a time, checking names, dtype and shapes against `shapes`."""
    folder = Path(folder)
    seen: set[str] = set()
    for filename, _ in delta_files(folder).items():
        try:
            with safe_open(folder / filename, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if name not in shapes:
                        raise CorruptArtifactError(f"{filename} holds an unexpected tensor {name!r}")
                    tensor = f.get_tensor(name)
                    if tensor.dtype != torch.int64 or tuple(tensor.shape) != tuple(shapes[name]):
                        raise CorruptArtifactError(
                            f"{filename}: {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                            f"expected int64 {tuple(shapes[name])}"
                        )
                    seen.add(name)
                    yield name, tensor
        except (SafetensorError, OSError) as err:
            raise CorruptArtifactError(f"cannot read {folder / filename}: {err}") from None
    missing = sorted(set(shapes) - seen)
    if missing:
        raise CorruptArtifactError(f"the sum lacks {len(missing)} tensor(s), e.g. {missing[:3]}")


def load_mask_file(
    path: str | os.PathLike, expected_digest: str, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Read one task's mask file, check its digest and layout, and return its packed masks."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptArtifactError(f"mask file {path} is missing") from None
    import hashlib

    if "sha256:" + hashlib.sha256(data).hexdigest() != expected_digest:
        raise CorruptArtifactError(f"mask file {path} does not match its recorded digest (corrupted or replaced)")
    try:
        masks = load_safetensors_bytes(data)
    except SafetensorError as err:
        raise CorruptArtifactError(f"cannot read mask file {path}: {err}") from None
    _check_mask_layout(path, masks, shapes)
    return masks


def _check_mask_layout(path: Path, masks: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
    if set(masks) != set(shapes):
        raise CorruptArtifactError(f"mask file {path} does not cover the tuned parameters")
    for name, shape in shapes.items():
        numel = 1
        for dim in shape:
            numel *= dim
        if masks[name].dtype != torch.uint8 or masks[name].shape != (packed_size(numel),):
            raise CorruptArtifactError(f"mask file {path}: {name!r} has the wrong packed layout")


def _map_uint8_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Views of the uint8 tensors of a safetensors file, over one private memory map of the whole file.

    Mask files hold hundreds of small tensors; `safe_open` builds a storage per tensor (tens of microseconds each),
    while slicing one mapped tensor costs about one. The header is checked as strictly as safetensors does: its
    size, JSON, dtype U8, 1-D shapes, and contiguous, in-bounds data offsets covering the data exactly.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if size < 8 or header_size > min(size - 8, 100_000_000):
                raise CorruptArtifactError("header size out of bounds")
            header = json.loads(f.read(header_size))
        entries = sorted(
            ((info["data_offsets"], name, info) for name, info in header.items() if name != "__metadata__"),
            key=lambda entry: entry[0],
        )
        views: dict[str, torch.Tensor] = {}
        data = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8) if size else None
        end = 0
        for (start, stop), name, info in entries:
            if info["dtype"] != "U8" or len(info["shape"]) != 1 or start != end or stop - start != info["shape"][0]:
                raise CorruptArtifactError(f"unexpected entry for {name!r}")
            views[name] = data[8 + header_size + start : 8 + header_size + stop]
            end = stop
        if 8 + header_size + end != size:
            raise CorruptArtifactError("the data does not fill the file")
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as err:
        raise CorruptArtifactError(f"cannot read mask file {path}: {err}") from None
    return views


@contextlib.contextmanager
def mapped_mask_file(
    path: str | os.PathLike, expected_digest: str, shapes: Mapping[str, tuple[int, ...]]
) -> Iterator[dict[str, torch.Tensor]]:
    """One task's packed masks, memory-mapped, while a background thread checks the file's digest.

    For callers that can undo what they do with the masks (a served model switching tasks): they start using them
    at once instead of after a full read and hash, and the two overlap. The layout is checked before anything is
    yielded; on leaving the block, a digest mismatch raises [`~hf_sift.errors.CorruptArtifactError`], and the
    caller must then discard what it computed from the masks. [`load_mask_file`] verifies before returning.
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptArtifactError(f"mask file {path} is missing")
    if hasattr(os, "posix_fadvise"):  # start reading the whole file now, not page by page as it is used
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_sift-digest") as pool:
        digest = pool.submit(file_digest, str(path))
        masks = _map_uint8_safetensors(path)
        _check_mask_layout(path, masks, shapes)
        yield masks
        if digest.result() != expected_digest:
            raise CorruptArtifactError(f"mask file {path} does not match its recorded digest (corrupted or replaced)")


def save_mask_file(path: Path, masks: Mapping[str, torch.Tensor]) -> str:
    """Write one task's packed masks and return the file's digest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {n: t.detach().cpu().contiguous() for n, t in masks.items()},
        path,
        # A single metadata key: safetensors writes several keys in a per-process random order, which would
        # make the bytes of equal artifacts differ.
        metadata={"format": "hf_sift-mask"},
    )
    apply_umask(path)
    return file_digest(str(path))


def write_artifact(
    folder: str | os.PathLike,
    config: ArtifactConfig,
    manifest: Mapping[str, Mapping[str, Any]],
    delta: Mapping[str, torch.Tensor],
    masks: Mapping[str, Path | Mapping[str, torch.Tensor]],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    extra_files: Mapping[str, bytes] | None = None,
    *,
    precondition: Callable[[Path], None] | None = None,
    plain: Callable[[Path], tuple[dict[str, str], dict[str, str]]] | None = None,
) -> tuple[dict[str, str], ArtifactState]:
    """Write a whole artifact atomically into `folder`, keeping the user's other files there.

    `masks` maps every task id to either an existing mask file (hard-linked, not rewritten) or its packed masks.
    `extra_files` maps more artifact files (relative paths [`is_artifact_file`] knows, e.g. the unlearning log) to
    their bytes, written in the same atomic step. The config's `binding_digest` is computed here, once the mask
    digests are known. `precondition` is checked under the folder's lock right before the swap (see
    [`~hf_sift.atomic.staged_folder`] and [`~hf_sift.artifact_state`]). `plain` writes the plain merge P into the
    staging folder and returns its tensor digests and those of the base: the artifact is then format 2
    (`config.plain_digests`, `config.base_tensor_digests` and `config.format_version` are set here); without it,
    format 1. Returns the digest of each mask file written or linked, and the state written.
    """
    folder = Path(folder)
    mask_digests: dict[str, str] = {}
    with staged_folder(folder, precondition) as stage:
        if folder.is_dir():
            for path in folder.rglob("*"):
                relative = path.relative_to(folder).as_posix()
                if path.is_file() and not is_artifact_file(relative):
                    keep_file(path, stage / relative)
        for task_id in sorted(masks):
            target = stage / mask_filename(task_id)
            source = masks[task_id]
            if isinstance(source, Path):
                try:
                    link_or_copy(source, target)
                except OSError as err:
                    raise CorruptArtifactError(
                        f"mask file {source} of task {task_id!r} cannot be read ({err.strerror or err}); nothing was "
                        "written: restore it, or remove the task with its replayed task vector before saving"
                    ) from None
                mask_digests[task_id] = manifest[task_id]["mask_digest"]
            else:
                mask_digests[task_id] = save_mask_file(target, source)
        cpu_delta = {n: t.detach().cpu().contiguous() for n, t in delta.items()}
        split = split_torch_state_dict_into_shards(
            cpu_delta, filename_pattern=DELTA_PATTERN, max_shard_size=max_shard_size
        )
        for filename, names in split.filename_to_tensors.items():
            save_file({n: cpu_delta[n] for n in names}, stage / filename, metadata={"format": "hf_sift-delta"})
            apply_umask(stage / filename)
        if split.is_sharded:
            index = {
                "metadata": {"format": "hf_sift-delta"},
                "weight_map": dict(sorted(split.tensor_to_filename.items())),
            }
            _dump_json(index, stage / DELTA_INDEX_NAME)
        config.plain_digests, config.base_tensor_digests = (None, None) if plain is None else plain(stage)
        config.format_version = 1 if plain is None else 2
        records = {t: {**manifest[t], "mask_digest": mask_digests[t]} for t in sorted(manifest)}
        _dump_json({"tasks": records}, stage / MANIFEST_NAME)
        config.binding_digest = config.compute_binding(records)
        (stage / CONFIG_NAME).write_text(config.to_json_string(), encoding="utf-8")
        for relative, data in (extra_files or {}).items():
            (stage / relative).write_bytes(data)
            apply_umask(stage / relative)
        written = ArtifactState.read(stage)
    return mask_digests, written

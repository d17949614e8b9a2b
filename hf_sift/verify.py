"""Check every file of an artifact against the others: the sum, the masks, the config, the manifest and the log."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .artifact import (
    CONFIG_NAME,
    MANIFEST_NAME,
    MASKS_DIR,
    delta_files,
    iter_delta,
    load_mask_file,
    mask_filename,
    read_config,
    read_manifest,
)
from .artifact_config import ArtifactConfig
from .compatibility import Compatibility, check_compatible
from .digest import digest_lazy, file_digest
from .errors import SiftError
from .masks import popcount
from .plain_merge_check import PlainMergeCheck
from .unlearning_log import UnlearningLog


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def _sum_digest(
    directory: Path,
    shapes: dict[str, tuple[int, ...]],
    problems: list[str],
    visit: Callable[[str, torch.Tensor], None] | None = None,
) -> str | None:
    """The digest of the stored sum, streamed tensor by tensor (each also given to `visit`); None (with the problem)
    when it cannot be read."""
    try:
        files = delta_files(directory)
    except SiftError as err:
        problems.append(str(err))
        return None
    with contextlib.ExitStack() as stack:
        where: dict[str, Any] = {}
        for filename in files:
            try:
                handle = stack.enter_context(safe_open(directory / filename, framework="pt"))
            except (SafetensorError, OSError) as err:
                problems.append(f"{filename}: cannot be read ({err})")
                return None
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name in where or name not in shapes:
                    problems.append(f"{filename}: holds an unexpected or repeated tensor {name!r}")
                    return None
                where[name] = (filename, handle)
        missing = sorted(set(shapes) - set(where))
        if missing:
            problems.append(f"{', '.join(files)}: the sum lacks {len(missing)} tuned parameter(s), e.g. {missing[:3]}")
            return None

        def load(name: str) -> torch.Tensor:
            filename, handle = where[name]
            tensor = handle.get_tensor(name)
            if tensor.dtype != torch.int64 or tuple(tensor.shape) != shapes[name]:
                raise SiftError(
                    f"{filename}: {name!r} is {tensor.dtype} {tuple(tensor.shape)}, not int64 {shapes[name]}"
                )
            if visit is not None:
                visit(name, tensor)
            return tensor

        try:
            return digest_lazy(shapes, load)
        except (SiftError, SafetensorError, OSError) as err:
            problems.append(str(err))
            return None


def _check_masks(directory: Path, manifest: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    problems = []
    num_elements = 0
    for shape in shapes.values():
        count = 1
        for dim in shape:
            count *= dim
        num_elements += count
    for task_id, record in sorted(manifest.items()):
        filename = mask_filename(task_id)
        if not isinstance(record, dict):
            problems.append(f"{MANIFEST_NAME}: the record of {task_id!r} is not an object")
            continue
        if not isinstance(record.get("digest"), str) or not _DIGEST.fullmatch(record["digest"]):
            problems.append(f"{MANIFEST_NAME}: the record of {task_id!r} has no valid task digest")
        path = directory / filename
        if not path.is_file():
            problems.append(f"{filename}: missing (task {task_id!r} is in {MANIFEST_NAME})")
            continue
        if file_digest(str(path)) != record.get("mask_digest"):
            problems.append(f"{filename}: does not match the mask_digest recorded in {MANIFEST_NAME}")
            continue
        try:
            masks = load_mask_file(path, record["mask_digest"], shapes)
        except SiftError as err:
            problems.append(f"{filename}: {err}")
            continue
        selected = sum(popcount(m) for m in masks.values())
        expected = {
            "num_elements": num_elements,
            "num_selected": selected,
            "mask_density": selected / num_elements if num_elements else 0.0,
        }
        for key, value in expected.items():
            if record.get(key) != value:
                problems.append(
                    f"{MANIFEST_NAME}: {key} of {task_id!r} is {record.get(key)!r}, its mask gives {value!r}"
                )
    masks_dir = directory / MASKS_DIR
    if masks_dir.is_dir():
        for path in sorted(masks_dir.iterdir()):
            if path.name.removesuffix(".safetensors") not in manifest:
                problems.append(f"{MASKS_DIR}/{path.name}: belongs to no task of {MANIFEST_NAME}")
    return problems


def _check_store(
    directory: Path, config: ArtifactConfig, manifest: dict[str, Any], shapes: dict[str, tuple[int, ...]], store: Any
) -> list[str]:
    """Check the artifact against the task vectors `store` (a TaskVectorStore) holds for its tasks."""
    problems = []
    merge = Compatibility(config.sign_seed, config.scale_bits, config.base_digest, shapes, config.dtypes)
    residual = dict(iter_delta(directory, shapes))  # Q minus every stored q_t: zero when all tasks are stored
    complete = True
    for task_id, record in sorted(manifest.items()):
        if task_id not in store:
            complete = False
            continue
        try:
            vector = store.get(task_id, expected_digest=record.get("digest"))
            masks = load_mask_file(directory / mask_filename(task_id), record["mask_digest"], shapes)
        except SiftError as err:
            problems.append(str(err))
            complete = False
            continue
        try:
            check_compatible(merge, vector, f"the stored task vector {store.path(task_id)}")
        except SiftError as err:
            problems.append(f"{CONFIG_NAME} or the store: {err}")
            complete = False
            continue
        if any(not torch.equal(masks[n], vector.packed_masks[n]) for n in shapes):
            problems.append(f"{mask_filename(task_id)}: differs from the mask of {store.path(task_id)}")
        for name in shapes:
            residual[name].sub_(vector.q[name])
    if complete and any(bool(t.any()) for t in residual.values()):
        files = ", ".join(delta_files(directory))
        problems.append(f"{files}: the sum is not the sum of the stored task vectors of its tasks")
    return problems


def verify_artifact(directory: str | os.PathLike, task_vector_store: str | os.PathLike | None = None) -> list[str]:
    """Check an artifact's files against each other and return what fails, one sentence each naming the file.

    Recomputes the digest of the sum and of every mask file; checks the config (format, T, the tuned parameters,
    the sum's digest), the plain merge P of a format-2 artifact (see [`~hf_sift.plain_merge_check`]: each tensor
    against its digest, the untuned ones against θ0's, and, when the recorded base loads without a download, the
    tuned ones against the plain merge recomputed from the sum), each manifest record (task digest, mask digest, element and mask counts, density), that
    every mask belongs to a task, and that the unlearning log is an unbroken chain ending at the sum. An empty
    list means every check holds. Reads the sum one tensor at a time.

    With a task-vector store, also checks each stored task of the artifact: its digest against the record, its
    sign seed, S, base digest and parameters against the config, its mask against the mask file, and, when every
    task is stored, that the sum is exactly the sum of the stored task vectors.

    Args:
        directory (`str` or `os.PathLike`): The artifact's folder.
        task_vector_store (`str` or `os.PathLike`, *optional*): A [`~hf_sift.TaskVectorStore`] folder.
    """
    directory = Path(directory)
    problems: list[str] = []
    config = manifest = shapes = None
    try:
        config = read_config(directory)
        shapes = config.shapes
    except SiftError as err:
        problems.append(f"{CONFIG_NAME}: {err}")
    try:
        manifest = read_manifest(directory)
    except SiftError as err:
        problems.append(f"{MANIFEST_NAME}: {err}")
    if config is not None and manifest is not None:
        if config.num_tasks != len(manifest):
            problems.append(f"{CONFIG_NAME}: num_tasks is {config.num_tasks}, {MANIFEST_NAME} lists {len(manifest)}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an artifact written before binding digests: nothing to check
                config.check_binding(manifest, CONFIG_NAME)
        except SiftError as err:
            problems.append(str(err))

    digest = None
    plain = None
    if config is not None and manifest is not None and config.format_version >= 2:
        plain = PlainMergeCheck(directory, config, len(manifest))
    if shapes is not None:
        digest = _sum_digest(directory, shapes, problems, None if plain is None else plain.visit)
        if config is not None and digest is not None and digest != config.delta_digest:
            files = ", ".join(delta_files(directory))
            problems.append(
                f"{files}: the sum's digest {digest} differs from the delta_digest in {CONFIG_NAME} "
                f"({config.delta_digest})"
            )
        if plain is not None:
            problems.extend(plain.finish(sum_verified=digest is not None and digest == config.delta_digest))
        if manifest is not None:
            problems.extend(_check_masks(directory, manifest, shapes))
    if task_vector_store is not None and config is not None and manifest is not None and digest is not None:
        from .task_vector_store import TaskVectorStore

        problems.extend(_check_store(directory, config, manifest, shapes, TaskVectorStore(task_vector_store)))
    try:
        log = UnlearningLog.load(directory)
    except SiftError as err:
        problems.append(str(err))
    else:
        if digest is not None:
            problems.extend(log.verify(digest, f"the sum in {', '.join(delta_files(directory))}"))
        elif config is not None:
            problems.extend(log.verify(config.delta_digest, f"the delta_digest in {CONFIG_NAME}"))
        else:
            problems.extend(log.verify(None))
    return problems

"""Merge checkpoints on disk into a standard transformers checkpoint, one tensor at a time.

The output folder holds `config.json` (and the generation config, tokenizer and other small files) copied from
the base, the merged weights (`model.safetensors`, or shards with their index), `merging_config.json` (the method,
its parameters, the tasks and what the method reports), a `README.md` model card, and for the localisation methods
one bit-packed mask file per task under `masks/` (same layout as SIFT masks). The folder is written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..artifact import CONFIG_NAME
from ..atomic import staged_folder
from ..errors import ParameterMismatchError
from ..masks import pack_bits, packed_size, unpack_bits
from ..merged_delta import MergedDelta
from ..output_dir import check_output_dir
from ..selection import ParameterSelection
from ..shard_size import DEFAULT_MAX_SHARD_SIZE
from ..task_id import validate_task_id
from ..version import __version__
from .registry import MergeMethod, create_method
from .sift import SiftMasks
from .sift_artifact import merge_sift_artifact
from .streaming import CheckpointReader, StreamingCheckpointWriter


MERGING_CONFIG = "merging_config.json"
MASKS_DIR = "masks"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".index.json")


@dataclass
class MergeResult:
    """What [`merge_checkpoints`] wrote.

    Args:
        output_dir (`Path`): The checkpoint folder.
        config (`dict`): The content of `merging_config.json`.
    """

    output_dir: Path
    config: dict[str, Any] = field(default_factory=dict)


def default_task_ids(models: Sequence[str | os.PathLike]) -> list[str]:
    """Task ids from the models' folder names (made unique with a numeric suffix)."""
    ids: list[str] = []
    for model in models:
        stem = Path(model).name or "model"
        candidate, suffix = stem, 2
        while candidate in ids:
            candidate, suffix = f"{stem}-{suffix}", suffix + 1
        ids.append(validate_task_id(candidate))
    return ids


def copy_model_files(source: Path, target: Path) -> list[str]:
    """Copy the small non-weight files of a checkpoint folder (config, tokenizer, ...); returns their names."""
    copied = []
    for path in sorted(source.iterdir()) if source.is_dir() else []:
        name = path.name
        if not path.is_file() or name.startswith(".") or name == "README.md" or name == MERGING_CONFIG:
            continue
        if name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(path, target / name)
        copied.append(name)
    return copied


def write_model_card(target: Path, base: str, method: MergeMethod, task_ids: Sequence[str], models: Sequence[str]):
    """Write `README.md` with YAML front matter naming the method and its parameters."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=base if not Path(base).exists() else None,
        library_name="transformers",
        tags=["merge", "hf_sift", method.name],
    )
    params = "\n".join(f"- `{k}`: `{v}`" for k, v in method.params.to_dict().items()) or "- (none)"
    tasks = "\n".join(f"- `{t}`: {m}" for t, m in zip(task_ids, models))
    content = (
        f"---\n{data.to_yaml()}\n---\n\n# Merged model ({method.name})\n\n"
        f"Merged with hf_sift {__version__} using the `{method.name}` method from the base `{base}`.\n\n"
        f"## Parameters\n\n{params}\n\n## Merged models\n\n{tasks}\n\n"
        f"## Removing a task\n\nExact removal supported: {'yes' if method.supports_exact_removal else 'no'}; "
        f"tasks to retrain to remove one: {method.removal_cost}.\n"
    )
    ModelCard(content).save(target / "README.md")


def merge_checkpoints(
    method: MergeMethod | str,
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    params: Mapping[str, Any] | None = None,
    task_ids: Sequence[str] | None = None,
    parameters: ParameterSelection | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> MergeResult:
    """Merge finetuned checkpoints of `base` with `method`, streaming tensor by tensor.

    The `sift` method writes a SIFT artifact instead of a plain checkpoint (see `hf_sift.merging.sift_artifact`):
    `MergedMaskedModel` and `hf-sift export` serve it, and `MergedDelta.remove` removes a task from it exactly.

    Args:
        method (`MergeMethod` or `str`): A method instance, or a registered name (then built from `params`).
        base (`str` or `os.PathLike`): The base checkpoint folder θ0 (for NegMerge: the model to unlearn from).
        models (`Sequence[str | os.PathLike]`): The finetuned checkpoint folders.
        output_dir (`str` or `os.PathLike`): Where to write the merged checkpoint (replaced atomically). It must not
            be, hold or lie inside `base` or one of the `models` ([`~hf_sift.errors.OutputDirError`]).
        params (`Mapping[str, Any]`, *optional*): Method parameters when `method` is a name.
        task_ids (`Sequence[str]`, *optional*): One id per model (mask file names); the folder names by default.
        parameters (`ParameterSelection`, *optional*):
            Which floating-point tensors are merged; all of them by default (for `sift`: all but input embeddings and
            the LM head, as docs/FORMAT.md defines P). Others are copied from the base.
        max_shard_size (`int` or `str`, *optional*, defaults to `"2GB"`): Shard size of the output weights.
    """
    check_output_dir(output_dir, [base, *models], overwrite=True, flag="output_dir")
    if isinstance(method, str):
        method = create_method(method, params)
    elif params:
        raise ParameterMismatchError("`params` is only used when `method` is given by name")
    if not models:
        raise ParameterMismatchError("a merge needs at least one finetuned model")
    task_ids = default_task_ids(models) if task_ids is None else [validate_task_id(t) for t in task_ids]
    if len(task_ids) != len(models) or len(set(task_ids)) != len(task_ids):
        raise ParameterMismatchError("task ids must be unique, one per model")
    if isinstance(method, SiftMasks):  # a real SIFT artifact, not a plain checkpoint with masks
        config = merge_sift_artifact(method.params, base, models, output_dir, task_ids, parameters, max_shard_size)
        return MergeResult(Path(output_dir), config)
    selection = parameters if parameters is not None else ParameterSelection(exclude=())
    base_reader = CheckpointReader(base)
    readers = [CheckpointReader(m) for m in models]
    specs = {n: (base_reader.shape(n), base_reader.dtype(n)) for n in base_reader.names()}
    merged = [n for n, (_, dtype) in specs.items() if dtype is not None and dtype.is_floating_point]
    merged = [n for n in merged if selection.matches(n)]
    for reader in readers:
        for name in merged:
            if name not in reader or reader.shape(name) != specs[name][0]:
                raise ParameterMismatchError(f"{reader.path} lacks {name!r} or has another shape than the base")
    method.begin(task_ids)
    with staged_folder(output_dir) as stage:
        writer = StreamingCheckpointWriter(stage, specs, max_shard_size, {"hf_sift_merge_method": method.name})
        merged_set = set(merged)
        mask_specs = {n: ((packed_size(_numel(specs[n][0])),), torch.uint8) for n in writer.order if n in merged_set}
        mask_writers = []
        if method.localizes:
            (stage / MASKS_DIR).mkdir()
            for task in task_ids:
                mask_writers.append(
                    StreamingCheckpointWriter(
                        stage / MASKS_DIR,
                        mask_specs,
                        max_shard_size=1 << 62,
                        metadata={"format": "hf_sift-mask"},
                        filename_pattern=task.replace("{", "{{").replace("}", "}}") + "{suffix}.safetensors",
                    )
                )
        try:
            for name in writer.order:
                base_tensor = base_reader.get(name)
                if name not in merged_set:
                    writer.write(name, base_tensor)
                    continue
                result = method.merge_tensor(name, base_tensor, [r.get(name) for r in readers])
                writer.write(name, result.tensor)
                for mask_writer, mask in zip(mask_writers, result.masks or []):
                    mask_writer.write(name, pack_bits(mask))
            for w in (writer, *mask_writers):
                w.close()
        except BaseException:
            for w in (writer, *mask_writers):
                w.abort()
            raise
        copy_model_files(base_reader.folder, stage)
        config = {
            **method.describe(),
            "hf_sift_version": __version__,
            "base": str(base),
            "tasks": [{"id": t, "model": str(m)} for t, m in zip(task_ids, models)],
            "merged_tensors": len(merged),
            "copied_tensors": len(specs) - len(merged),
            "masks": {t: f"{MASKS_DIR}/{t}.safetensors" for t in task_ids} if method.localizes else {},
            **method.summary(),
        }
        (stage / MERGING_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_model_card(stage, str(base), method, task_ids, [str(m) for m in models])
    return MergeResult(Path(output_dir), config)


def _numel(shape: Sequence[int]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel


def load_task_masks(merged_dir: str | os.PathLike, task_id: str) -> dict[str, torch.Tensor]:
    """The boolean per-task masks written by a localisation method, unpacked to the tensors' shapes."""
    merged_dir = Path(merged_dir)
    if (merged_dir / CONFIG_NAME).is_file():  # a SIFT artifact
        delta = MergedDelta.from_pretrained(merged_dir, verify=False)
        packed = delta.load_mask(task_id)
        return {n: unpack_bits(packed[n], _numel(delta.shapes[n]), delta.shapes[n]) for n in delta.names}
    config = json.loads((merged_dir / MERGING_CONFIG).read_text())
    if validate_task_id(task_id) not in config.get("masks", {}):
        raise ParameterMismatchError(f"{merged_dir} has no mask for task {task_id!r}")
    reader = CheckpointReader(merged_dir)
    masks = {}
    with safe_open(merged_dir / config["masks"][task_id], framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            shape = reader.shape(name)
            masks[name] = unpack_bits(handle.get_tensor(name), _numel(shape), shape)
    return masks


def task_state_dict(
    merged_dir: str | os.PathLike, base: str | os.PathLike, task_id: str, rescale: float | None = None
) -> dict[str, torch.Tensor]:
    """Serve one task from a localised merge: ``θ0 + r_t · m_t ∘ (θ_merged - θ0)`` on the masked tensors.

    `r_t` defaults to the task's recorded rescaler (EMR) or 1.0 (TALL-masks). For a SIFT artifact (written by the
    `sift` method) the task's served weights are those of `MergedDelta.materialize`, computed by
    `hf_sift.served_weights.served_tensor`, with `rescale` as the scale (1/T by default).
    """
    merged_dir = Path(merged_dir)
    if (merged_dir / CONFIG_NAME).is_file():
        delta = MergedDelta.from_pretrained(merged_dir)
        reader = CheckpointReader(base)
        base_state = {n: reader.get(n) for n in reader.names()}
        return delta.materialize(base_state, task_id, scale=rescale)
    config = json.loads((merged_dir / MERGING_CONFIG).read_text())
    if rescale is None:
        rescale = float(config.get("rescalers", {}).get(task_id, 1.0))
    masks = load_task_masks(merged_dir, task_id)
    merged_reader, base_reader = CheckpointReader(merged_dir), CheckpointReader(base)
    out = {}
    for name in merged_reader.names():
        tensor = merged_reader.get(name)
        if name in masks:
            theta0 = base_reader.get(name)
            dtype = torch.float64 if theta0.dtype == torch.float64 else torch.float32
            delta = (tensor.to(dtype) - theta0.to(dtype)) * masks[name]
            tensor = (theta0.to(dtype) + delta * rescale).to(theta0.dtype)
        out[name] = tensor
    return out

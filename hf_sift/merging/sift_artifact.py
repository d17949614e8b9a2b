"""`merge_checkpoints` with the `sift` method: finetuned checkpoints on disk into a real SIFT artifact.

The output is what [`~hf_sift.MergedDelta.save_pretrained`] writes (the int64 sum Q, `sift_config.json`, the
manifest and one bit-packed mask per task; see docs/FORMAT.md), plus the base's tokenizer files and a model card.
[`~hf_sift.MergedMaskedModel`] and `hf-sift export` serve it; a task is removed exactly by rebuilding its task
vector from its checkpoint and subtracting it ([`~hf_sift.MergedDelta.remove`]), which gives the bytes of a fresh
merge of the other tasks.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..atomic import staged_folder
from ..digest import state_dict_digest
from ..errors import ParameterMismatchError
from ..hub.download import TOKENIZER_PATTERNS
from ..merged_delta import MergedDelta
from ..remote_code import refuse_remote_code
from ..selection import ParameterSelection
from ..shard_size import DEFAULT_MAX_SHARD_SIZE
from ..task_vector import TaskVector
from ..version import __version__
from .registry import InvalidMergeParameterError
from .sift import SiftParams
from .streaming import CheckpointReader


def load_base_state_dict(base: str | os.PathLike) -> dict:
    """θ0 as transformers loads it (every tensor, tied ones under each name): what serving the artifact loads."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    refuse_remote_code(base)
    config = AutoConfig.from_pretrained(base, trust_remote_code=False)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(base, dtype="auto", trust_remote_code=False)
    return model.state_dict()


def _card(base: str, params: SiftParams, task_ids: Sequence[str], models: Sequence[str], names: int) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name="hf_sift", tags=["merge", "hf_sift", "sift-masks"])
    tasks = "\n".join(f"- `{t}`: {m}" for t, m in zip(task_ids, models))
    return (
        f"---\n{data.to_yaml()}\n---\n\n# SIFT-Masks artifact\n\n"
        f"Merged with hf_sift {__version__} (`hf-sift merge --method sift`) from the base `{base}`, with sign seed "
        f"{params.sign_seed} and S = {params.scale_bits} over {names} tuned tensors: the exact int64 sum of the "
        "task vectors and one bit-packed mask per task (docs/FORMAT.md).\n\n"
        f"## Tasks at the time of the merge\n\n{tasks}\n\n"
        "## Serving\n\n"
        "`hf_sift.MergedMaskedModel.from_pretrained(folder, task=...)`, or `hf-sift export folder --task ... -o out` "
        "for a plain transformers checkpoint. The base's weights are checked against the recorded digests.\n\n"
        "## Removing a task\n\n"
        "Exact removal supported: yes; tasks to retrain to remove one: 1 (none when its finetuned checkpoint is "
        "kept). Rebuild its task vector with `TaskVector.from_state_dicts(θ0, θ_task, sign_seed)` over the tuned "
        "parameters, then `MergedDelta.from_pretrained(folder).remove(task, task_vector)` and `save_pretrained`: a "
        "task vector that does not reproduce the recorded digest is refused, and the result is byte for byte a fresh "
        "merge of the other tasks.\n"
    )


def merge_sift_artifact(
    params: SiftParams,
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    task_ids: Sequence[str],
    parameters: ParameterSelection | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> dict:
    """Merge finetuned checkpoints of `base` into a SIFT artifact at `output_dir` (written atomically).

    Args:
        params (`SiftParams`): Sign seed and S; `scaling` must be unset (the scale is chosen when serving).
        base (`str` or `os.PathLike`): The base checkpoint folder θ0 (recorded in the artifact as an absolute path).
        models (`Sequence[str | os.PathLike]`): The finetuned checkpoint folders, read tensor by tensor.
        output_dir (`str` or `os.PathLike`): The artifact folder.
        task_ids (`Sequence[str]`): One id per model.
        parameters (`ParameterSelection`, *optional*): The tuned parameters P; by default every floating-point
            tensor except input embeddings and the LM head (docs/FORMAT.md).
        max_shard_size (`int` or `str`, *optional*, defaults to `DEFAULT_MAX_SHARD_SIZE`): Shard size of the sum.

    Returns:
        `dict`: A summary (method, parameters, tasks, tuned tensors).
    """
    if params.scaling is not None:
        raise InvalidMergeParameterError(
            "the sift method writes a SIFT artifact, whose scale is chosen when it is served "
            "(MergedMaskedModel.from_pretrained(scale=...), hf-sift export --scale): drop the 'scaling' parameter"
        )
    base_state = load_base_state_dict(base)
    delta = MergedDelta(
        base_state,
        params.sign_seed,
        parameters if parameters is not None else ParameterSelection(),
        scale_bits=params.scale_bits,
        base_model=str(Path(base).absolute()),
        base_model_digest=state_dict_digest(base_state),
    )
    for task_id, model in zip(task_ids, models):
        reader = CheckpointReader(model)
        for name in delta.names:
            if name not in reader or reader.shape(name) != delta.shapes[name]:
                raise ParameterMismatchError(f"{reader.path} lacks {name!r} or has another shape than the base")
        tuned = {name: reader.get(name) for name in delta.names}
        vector = TaskVector.from_state_dicts(
            base_state,
            tuned,
            params.sign_seed,
            delta.names,
            scale_bits=params.scale_bits,
            base_digest=delta.base_digest,
        )
        delta.add(task_id, vector)
        del tuned, vector
    with staged_folder(output_dir) as stage:
        base_folder = Path(base)
        for path in sorted(base_folder.iterdir()):
            if path.is_file() and any(path.match(pattern) for pattern in TOKENIZER_PATTERNS):
                shutil.copy2(path, stage / path.name)
        card = _card(str(base), params, task_ids, [str(m) for m in models], len(delta.names))
        (stage / "README.md").write_text(card, encoding="utf-8")
        delta.save_pretrained(stage, max_shard_size=max_shard_size)
    return {
        "method": "sift",
        "parameters": params.to_dict(),
        "hf_sift_version": __version__,
        "base": str(base),
        "tasks": [{"id": t, "model": str(m)} for t, m in zip(task_ids, models)],
        "merged_tensors": len(delta.names),
        "delta_digest": delta.digest,
    }

"""The plain merge P of a merge whose tuned parameters are a peft adapter: a peft checkpoint of the merged adapter.

When the tuned parameters are an adapter's (LoRA's `lora_A`/`lora_B`, ...), P is not a transformers checkpoint of
the base: it is the adapter at its plain merge, saved by peft itself (`adapter_config.json` and
`adapter_model.safetensors`), so that `PeftModel.from_pretrained(base, artifact)` loads it. The adapter's θ0 (its
seeded initialisation) is in no file, so P is written from the `PeftModel` at θ0 given as
`MergedDelta.save_pretrained(base=model)` (which `train_tasks` does). See docs/FORMAT.md, "Format version 2".

`plain_digests` is keyed by the tuned parameters' names (the model's, e.g. `...q_proj.lora_A.default.weight`); the
adapter file names them as peft saves them (the adapter name removed), and [`peft_checkpoint_names`] maps one to
the other. `base_tensor_digests` covers the adapter's θ0 (the tuned parameters).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from . import kernels
from .atomic import apply_umask
from .digest import digest_tensors, named_tensor_digest, tensor_digest
from .errors import BaseModelMismatchError, CorruptArtifactError, ParameterMismatchError
from .served_weights import served_tensor


if TYPE_CHECKING:
    from .merged_delta import MergedDelta


ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
PEFT_PLAIN_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)


PEFT_PREFIX = "base_model.model."  # how a PeftModel names the parameters it wraps (its adapter's among them)


def merges_an_adapter(names: Iterable[str]) -> bool:
    """Whether tuned parameter `names` are a `PeftModel`'s (an artifact trained with `peft_config`)."""
    return any(name.startswith(PEFT_PREFIX) for name in names)


def is_peft_model(model: Any) -> bool:
    """Whether `model` is a peft `PeftModel` (has adapter configs and a base model)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def peft_checkpoint_names(model: torch.nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Map each tuned parameter name of `model` to the name peft saves it under (peft's own state-dict utility).

    Raises:
        [`~hf_sift.errors.ParameterMismatchError`] if peft would not save one of them.
    """
    from peft.utils import get_peft_model_state_dict

    state = model.state_dict()
    markers = {name: torch.tensor(float(i)) for i, name in enumerate(state)}
    by_marker = {int(t.item()): name for name, t in markers.items()}
    saved = get_peft_model_state_dict(model, state_dict=markers)
    mapping = {by_marker[int(t.item())]: key for key, t in saved.items() if t.ndim == 0}
    missing = sorted(set(names) - set(mapping))
    if missing:
        raise ParameterMismatchError(f"peft does not save the tuned parameter(s) {missing[:3]} in its adapter")
    return {name: mapping[name] for name in names}


def check_peft_base(delta: MergedDelta, model: torch.nn.Module) -> None:
    """Raise unless `model` holds the tuned parameters at θ0 (the recorded dtypes and `base_digest`)."""
    state = model.state_dict()
    outside = sorted(set(delta.names) - set(state))
    wrong = [n for n in delta.names if n in state and state[n].dtype != delta.dtypes[n]]
    if outside or wrong:
        raise ParameterMismatchError(
            f"the peft model given as base lacks the tuned parameter(s) {(outside or wrong)[:3]} in the merge's dtypes"
        )
    if len(model.peft_config) != 1:
        raise ParameterMismatchError(
            f"the peft model given as base has {len(model.peft_config)} adapters; the plain merge is written for one"
        )
    if digest_tensors(state, delta.names) != delta.base_digest:
        raise BaseModelMismatchError(
            "the peft model given as base is not at the θ0 this delta was built on (its adapter weights differ): the "
            "plain merge would be wrong; nothing was written"
        )


def write_peft_plain_merge(
    stage: Path, model: torch.nn.Module, sums: Mapping[str, torch.Tensor], scale: float, scale_bits: int
) -> tuple[dict[str, str], dict[str, str]]:
    """Save the adapter of `model` (at θ0) at its plain merge into `stage` with peft; returns P's and θ0's digests.

    The model is not changed: the served tensors go to new memory, handed to peft's `save_pretrained` as its
    state dict. peft's model card is not kept (the artifact's README is the user's).
    """
    names = sorted(sums)
    state = model.state_dict()
    base_digests = {name: named_tensor_digest(name, state[name]) for name in names}
    with torch.no_grad(), kernels.deferred():
        served = {n: served_tensor(state[n], sums[n], scale=scale, scale_bits=scale_bits) for n in names}
    checkpoint_names = peft_checkpoint_names(model, names)
    scratch = stage / ".peft-plain-merge"  # created here, removed here
    try:
        model.save_pretrained(scratch, state_dict={**state, **served}, safe_serialization=True)
        for filename in PEFT_PLAIN_FILES:
            os.replace(scratch / filename, stage / filename)
            apply_umask(stage / filename)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    digests = {}
    with safe_open(stage / ADAPTER_WEIGHTS_NAME, framework="pt") as f:
        stored = set(f.keys())
        extra = sorted(stored - set(checkpoint_names.values()))
        if extra:
            raise CorruptArtifactError(
                f"peft saved tensors that are not tuned ({extra[:3]}): this adapter cannot be stored in format 2"
            )
        for name, key in checkpoint_names.items():
            digests[name] = tensor_digest(f.get_tensor(key))
    return digests, base_digests


def peft_plain_merge_writer(
    delta: MergedDelta, model: torch.nn.Module
) -> Callable[[Path], tuple[dict[str, str], dict[str, str]]]:
    """What writes the peft plain merge into an artifact's staging folder, `model` checked now (see
    [`check_peft_base`])."""
    check_peft_base(delta, model)
    scale, scale_bits, sums = delta.default_scale(), delta.scale_bits, delta.sum
    return lambda stage: write_peft_plain_merge(stage, model, sums, scale, scale_bits)


def stored_peft_names(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """Map the tuned parameter names to the tensors of a stored peft plain merge: peft's names are the model's with
    one dotted component (the adapter name) removed. Raises if a name has no unique match."""
    with safe_open(folder / ADAPTER_WEIGHTS_NAME, framework="pt") as f:
        keys = set(f.keys())
    mapping = {}
    for name in names:
        parts = name.split(".")
        found = {".".join(parts[:i] + parts[i + 1 :]) for i in range(len(parts))} & keys
        if len(found) != 1:
            raise CorruptArtifactError(f"{ADAPTER_WEIGHTS_NAME} has no single tensor for {name!r}")
        mapping[name] = found.pop()
    return mapping

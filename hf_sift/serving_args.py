"""Checks of the arguments of [`~hf_sift.MergedMaskedModel.from_pretrained`] that concern the base model's load."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .base_model import BASE_HUB_KWARGS
from .errors import InvalidArgumentTypeError, ReservedArgumentError, ServingDtypeError


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`None`/"auto" keep the dtype the merge was built on; anything else must be a floating-point dtype."""
    if dtype is None or dtype == "auto":
        return None
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ServingDtypeError(f"cannot serve weights in {dtype!r}: a floating-point dtype is needed")
    return resolved


# `from_pretrained` arguments of the base model that `MergedMaskedModel.from_pretrained` sets itself or that would
# change the weights it serves: refused in `model_kwargs`.
RESERVED_MODEL_KWARGS = frozenset(
    {
        "pretrained_model_name_or_path",
        "revision",
        "dtype",
        "torch_dtype",
        "device_map",
        "config",
        "state_dict",
        "quantization_config",
        "load_in_8bit",
        "load_in_4bit",
        "trust_remote_code",
        "gguf_file",
        "from_tf",
        "from_flax",
        "use_safetensors",
        "weights_only",
        *BASE_HUB_KWARGS,
    }
)


def check_model_kwargs(model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """`model_kwargs` as a dict, or [`~hf_sift.errors.ReservedArgumentError`] naming the keys it may not set."""
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, Mapping):
        raise InvalidArgumentTypeError(f"model_kwargs must be a dict, not {type(model_kwargs).__name__}")
    refused = sorted(set(model_kwargs) & RESERVED_MODEL_KWARGS)
    if refused:
        raise ReservedArgumentError(
            f"model_kwargs cannot set {refused}: MergedMaskedModel.from_pretrained sets them itself (pass them as its "
            "own arguments where it has them), or they would change the weights it serves"
        )
    return dict(model_kwargs)

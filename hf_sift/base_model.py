"""Load the base model θ0 of a merge with transformers: the one place that picks its class and dtype.

Serving ([`~hf_sift.MergedMaskedModel`]) and writing the plain merge of a format-2 artifact
([`~hf_sift.MergedDelta.save_pretrained`]) both load the base through [`load_base_model`], never with remote code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from .remote_code import refuse_remote_code


# Hub options that also apply to loading the base model with transformers.
BASE_HUB_KWARGS = ("cache_dir", "token", "local_files_only", "force_download")


def recorded_base_dtype(dtypes: Mapping[str, torch.dtype]) -> torch.dtype | str:
    """The dtype to load θ0 in: the one the merge was built on, or "auto" when its tuned parameters mix dtypes."""
    recorded = set(dtypes.values())
    return recorded.pop() if len(recorded) == 1 else "auto"


def base_model_class(name: str | os.PathLike, revision: str | None = None, **hub_kwargs: Any) -> type:
    """`AutoModelForSeq2SeqLM` for an encoder-decoder config, else `AutoModelForCausalLM` (remote code refused)."""
    refuse_remote_code(name, revision, **hub_kwargs)
    config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=False, **hub_kwargs)
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def load_base_model(
    name: str | os.PathLike,
    revision: str | None,
    dtype: torch.dtype | str,
    *,
    device_map: Any = None,
    model_class: type | None = None,
    hub_kwargs: Mapping[str, Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> PreTrainedModel:
    """Load the base model `name` (a folder or a Hub name) in `dtype`, with `trust_remote_code=False`.

    Args:
        name (`str` or `os.PathLike`): The base model's folder or Hub name.
        revision (`str`, *optional*): Its revision.
        dtype (`torch.dtype` or `str`): The dtype to load it in (`"auto"`: the checkpoint's).
        device_map (*optional*): Passed to transformers' `from_pretrained`.
        model_class (`type`, *optional*): The auto class; found from the config by default.
        hub_kwargs (`dict`, *optional*): `cache_dir`, `token`, `local_files_only`, `force_download`.
        model_kwargs (`dict`, *optional*): More keyword arguments for `from_pretrained`.
    """
    hub_kwargs = {k: v for k, v in (hub_kwargs or {}).items() if k in BASE_HUB_KWARGS}
    if model_class is None:
        model_class = base_model_class(name, revision, **hub_kwargs)
    else:
        refuse_remote_code(name, revision, **hub_kwargs)
    return model_class.from_pretrained(
        name,
        revision=revision,
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=False,
        **hub_kwargs,
        **(model_kwargs or {}),
    )

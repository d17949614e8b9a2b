"""Check the base model a merged delta is served on against the digests recorded when the merge was built.

Two digests guard the base: the base digest over the tuned parameters P (their θ0 enters every served weight), and
the base model digest over every tensor of the state dict (embeddings and the LM head are not tuned, but they are
served as they are and they shaped training). See docs/FORMAT.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from .digest import digest_lazy
from .errors import BaseModelMismatchError
from .merged_delta import MergedDelta
from .offload import offload_slots


def loaded_base_model_digest(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], tuned_base: Mapping[str, torch.Tensor]
) -> str:
    """The base model digest of a loaded model, reading offloaded tensors one at a time.

    θ0 of the tuned parameters is taken from `tuned_base` (a copy that serving only reads), the rest from `state`.
    """
    whole = {**state, **tuned_base}
    slots = offload_slots(model, [n for n in whole if n not in tuned_base])
    return digest_lazy(sorted(whole), lambda name: slots[name].read() if name in slots else whole[name])


def check_base_digests(delta: MergedDelta, base_digest: str, base_model_digest: str, allow_mismatch: bool) -> None:
    """Raise [`~hf_sift.errors.BaseModelMismatchError`] unless both digests of the base match the recorded ones.

    With `allow_mismatch`, a mismatch is a warning instead. An artifact without a base model digest (older ones)
    only gets a warning for it.
    """
    if base_digest != delta.base_digest:
        report_mismatch("the base model's weights differ from the ones this delta was built on", allow_mismatch)
    if delta.base_model_digest is None:
        warnings.warn(
            "the artifact records no digest of the whole base model (written by an older hf_sift, or by a "
            "MergedDelta built without base_model_digest=): only its tuned parameters were checked, not its "
            "embeddings or LM head",
            stacklevel=3,
        )
    elif base_model_digest != delta.base_model_digest:
        message = (
            "the base model differs from the one this delta was built on outside the tuned parameters (e.g. its "
            "embeddings or LM head, which are served as they are)"
        )
        report_mismatch(message, allow_mismatch)


def report_mismatch(message: str, allow_mismatch: bool) -> None:
    if not allow_mismatch:
        raise BaseModelMismatchError(
            f"{message}; pass allow_base_mismatch=True to serve on it anyway (the served weights are then not the "
            "merge's)"
        )
    warnings.warn(f"{message}; serving anyway because allow_base_mismatch=True", stacklevel=4)

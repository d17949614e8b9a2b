"""The one compatibility check of everything that enters a merge: same sign vector, S, θ0 and tuned parameters.

Task vectors can only be summed, and later subtracted, if they share the sign seed, the fixed-point scale S, the
base model θ0 (by digest) and the tuned parameters (names, shapes and dtypes). Every way into a
[`~hf_sift.MergedDelta`] (`add`, `remove`, `absorb`, resuming `train_tasks` from an artifact, and its all-reduce of
partial sums) calls [`check_compatible`], so they all refuse the same mismatches with the same errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import BaseModelMismatchError, ParameterMismatchError, SignSeedMismatchError


@dataclass(frozen=True)
class Compatibility:
    """What must agree between a merge and what enters it; picklable, so processes can exchange it.

    Args:
        sign_seed (`int`): The sign seed.
        scale_bits (`int`): The fixed-point scale S.
        base_digest (`str`, *optional*): Digest of θ0 over the tuned parameters (None: not known, not checked).
        shapes (`dict[str, tuple[int, ...]]`): Shape of each tuned parameter.
        dtypes (`dict[str, torch.dtype]`, *optional*): θ0's dtype of each tuned parameter (None: not known).
        base_model_digest (`str`, *optional*): Digest of the whole base model's state dict, embeddings and LM head
            included (None: not known, not checked).
    """

    sign_seed: int
    scale_bits: int
    base_digest: str | None
    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, torch.dtype] | None = None
    base_model_digest: str | None = None

    @classmethod
    def of(cls, source: Any) -> Compatibility:
        """The compatibility of a [`~hf_sift.MergedDelta`], a [`~hf_sift.TaskVector`] or another `Compatibility`."""
        if isinstance(source, Compatibility):
            return source
        return cls(
            sign_seed=source.sign_seed,
            scale_bits=source.scale_bits,
            base_digest=source.base_digest,
            shapes={n: tuple(s) for n, s in source.shapes.items()},
            dtypes=None if getattr(source, "dtypes", None) is None else dict(source.dtypes),
            base_model_digest=getattr(source, "base_model_digest", None),
        )


def check_compatible(merge: Any, other: Any, what: str = "the task vector") -> None:
    """Raise unless `other` can enter `merge`.

    Args:
        merge: The receiving side: a [`~hf_sift.MergedDelta`] or a [`Compatibility`].
        other: What enters it: a [`~hf_sift.TaskVector`], a [`~hf_sift.MergedDelta`] (e.g. a partial merge or an
            artifact to resume) or a [`Compatibility`].
        what (`str`, *optional*, defaults to `"the task vector"`): How to name `other` in the error.

    Raises:
        [`~hf_sift.errors.SignSeedMismatchError`] (sign seed or S), [`~hf_sift.errors.ParameterMismatchError`]
        (names, shapes or dtypes of the tuned parameters) or [`~hf_sift.errors.BaseModelMismatchError`] (θ0's
        digest over the tuned parameters, or over the whole base model; each only when both sides know it).
    """
    ours, theirs = Compatibility.of(merge), Compatibility.of(other)
    if (theirs.sign_seed, theirs.scale_bits) != (ours.sign_seed, ours.scale_bits):
        raise SignSeedMismatchError(
            f"{what} has sign_seed={theirs.sign_seed}, scale_bits={theirs.scale_bits}; "
            f"the merge has sign_seed={ours.sign_seed}, scale_bits={ours.scale_bits}"
        )
    if set(theirs.shapes) != set(ours.shapes):
        extra = sorted(set(theirs.shapes) - set(ours.shapes))[:3]
        missing = sorted(set(ours.shapes) - set(theirs.shapes))[:3]
        raise ParameterMismatchError(f"{what} covers other tuned parameters: extra {extra}, missing {missing}")
    for name, shape in ours.shapes.items():
        if tuple(theirs.shapes[name]) != tuple(shape):
            raise ParameterMismatchError(
                f"{what}: parameter {name!r} has shape {tuple(theirs.shapes[name])}, expected {tuple(shape)}"
            )
    if ours.dtypes is not None and theirs.dtypes is not None:
        for name, dtype in ours.dtypes.items():
            if theirs.dtypes.get(name) != dtype:
                raise ParameterMismatchError(
                    f"{what}: parameter {name!r} was tuned in {theirs.dtypes.get(name)}, the merge's in {dtype}"
                )
    if ours.base_digest is not None and theirs.base_digest is not None and theirs.base_digest != ours.base_digest:
        raise BaseModelMismatchError(
            f"{what} was computed on a base with digest {theirs.base_digest}, the merge's base has {ours.base_digest}"
        )
    if (
        None not in (ours.base_model_digest, theirs.base_model_digest)
        and ours.base_model_digest != theirs.base_model_digest
    ):
        raise BaseModelMismatchError(
            f"{what} was computed on another base model (its whole state dict, embeddings or LM head included, has "
            f"digest {theirs.base_model_digest}, the merge's {ours.base_model_digest})"
        )

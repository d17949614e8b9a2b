"""Task vectors τ_t = θ_t - θ0 in exact integer form, with their 1-bit SIFT masks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from .digest import digest_tensors
from .errors import ParameterMismatchError
from .fixed_point import SCALE_BITS, max_abs, quantize
from .masks import agreement_mask, pack_bits, popcount
from .selection import ParameterSelection, resolve_parameters
from .sign_vector import SignVector


def check_same_parameters(
    reference: Mapping[str, tuple[int, ...]], other: Mapping[str, torch.Tensor], what: str
) -> None:
    """Raise [`ParameterMismatchError`] unless `other` has every name of `reference` with the same shape."""
    missing = sorted(set(reference) - set(other))
    if missing:
        raise ParameterMismatchError(f"{what} lacks {len(missing)} tuned parameter(s), e.g. {missing[:3]}")
    for name, shape in reference.items():
        if tuple(other[name].shape) != tuple(shape):
            raise ParameterMismatchError(
                f"{what}: parameter {name!r} has shape {tuple(other[name].shape)}, expected {tuple(shape)}"
            )


@dataclass
class TaskVector:
    """One task's update over the tuned parameters, as exact integers, with its mask and digest.

    Build it with [`TaskVector.from_state_dicts`]. The fields are:

    Args:
        q (`dict[str, torch.Tensor]`):
            ``round((θ_t - θ0) * 2**scale_bits)`` per tuned parameter, int64.
        packed_masks (`dict[str, torch.Tensor]`):
            The mask ``1{v * τ > 0}`` per tuned parameter, bit-packed (see [`~hf_sift.masks.pack_bits`]).
        sign_seed (`int`): Seed of the sign vector v.
        scale_bits (`int`, *optional*, defaults to 40): The fixed-point scale S.
        base_digest (`str`, *optional*): Digest of θ0 over the tuned parameters, when known.
        metadata (`dict`, *optional*): Free-form, JSON-serialisable record kept in the artifact's manifest.
    """

    q: dict[str, torch.Tensor]
    packed_masks: dict[str, torch.Tensor]
    sign_seed: int
    scale_bits: int = SCALE_BITS
    base_digest: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_state_dicts(
        cls,
        base: Mapping[str, torch.Tensor],
        tuned: Mapping[str, torch.Tensor],
        sign_seed: int,
        parameters: ParameterSelection | Iterable[str] | None = None,
        *,
        scale_bits: int = SCALE_BITS,
        base_digest: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> TaskVector:
        """Build the task vector of `tuned` relative to `base`.

        Args:
            base (`Mapping[str, torch.Tensor]`): The base model's state dict θ0.
            tuned (`Mapping[str, torch.Tensor]`): The finetuned state dict θ_t.
            sign_seed (`int`): Seed of the sign vector shared by the merge.
            parameters (`ParameterSelection` or list of names, *optional*):
                The tuned parameters P; defaults to every floating-point parameter except input embeddings and
                the LM head.
            scale_bits (`int`, *optional*, defaults to 40): The fixed-point scale S.
            base_digest (`str`, *optional*):
                Digest of θ0 over P if already computed (it is computed otherwise).
            metadata (`dict`, *optional*): Record stored with the task in the artifact's manifest.
        """
        _, names = resolve_parameters(base, parameters)
        check_same_parameters({n: tuple(base[n].shape) for n in names}, tuned, "the tuned state dict")
        signs = SignVector(sign_seed)
        q, masks = {}, {}
        for name in names:
            q[name] = quantize(base[name], tuned[name], scale_bits, name)
            masks[name] = pack_bits(agreement_mask(q[name], signs.positive(name, q[name].shape, q[name].device)))
        return cls(
            q=q,
            packed_masks=masks,
            sign_seed=sign_seed,
            scale_bits=scale_bits,
            base_digest=base_digest if base_digest is not None else digest_tensors(base, names),
            metadata=dict(metadata or {}),
        )

    @property
    def names(self) -> list[str]:
        """Sorted names of the tuned parameters."""
        return sorted(self.q)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.q.items()}

    @property
    def mask(self) -> dict[str, torch.Tensor]:
        """The mask ``1{v * τ > 0}`` per parameter, bit-packed (1 bit per element, uint8)."""
        return self.packed_masks

    @cached_property
    def digest(self) -> str:
        """sha256 over the canonical serialisation of q (see docs/FORMAT.md)."""
        return digest_tensors(self.q)

    @cached_property
    def max_abs(self) -> dict[str, int]:
        """Largest magnitude of q per parameter (bounds the overflow check)."""
        return {name: max_abs(t) for name, t in self.q.items()}

    @property
    def num_elements(self) -> int:
        return sum(t.numel() for t in self.q.values())

    @cached_property
    def num_selected(self) -> int:
        """Number of elements where the mask is 1."""
        return sum(popcount(m) for m in self.packed_masks.values())

    @property
    def density(self) -> float:
        """Fraction of tuned elements in the mask."""
        return self.num_selected / self.num_elements if self.num_elements else 0.0

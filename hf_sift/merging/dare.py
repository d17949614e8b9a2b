"""DARE: drop a random fraction of each task vector and rescale the rest (Yu et al., 2024).

The drop masks come from `torch.bernoulli` inside `peft.utils.merge_utils.dare_linear` / `dare_ties`, run under a
forked RNG seeded from ``(seed, tensor name)``: a merge is reproducible, independent of tensor order, and leaves
the global RNG untouched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch

from .registry import (
    MergeMethod,
    MergeParams,
    TensorMerge,
    check_fraction,
    check_weights,
    register_method,
)


@dataclass(frozen=True)
class DareParams(MergeParams):
    """Parameters of DARE.

    Args:
        density (`float`, *optional*, defaults to 0.5): Fraction of each task vector kept (the rest is dropped).
        variant (`str`, *optional*, defaults to `"linear"`): `"linear"` sums, `"ties"` adds TIES' sign election.
        scaling (`float`, *optional*, defaults to 1.0): λ, applied to the merged task vector.
        weights (`tuple[float, ...]`, *optional*): One weight per model; all ones when omitted.
        seed (`int`, *optional*, defaults to 0): Seed of the drop masks.
        majority_sign_method (`str`, *optional*, defaults to `"total"`): Sign election of the `"ties"` variant.
    """

    density: float = 0.5
    variant: Literal["linear", "ties"] = "linear"
    scaling: float = 1.0
    weights: tuple[float, ...] | None = None
    seed: int = 0
    majority_sign_method: Literal["total", "frequency"] = "total"

    def __post_init__(self) -> None:
        check_fraction(self.density, "density")


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one tensor, from the merge seed and the tensor name."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@register_method
class Dare(MergeMethod):
    """Random drop-and-rescale of each task vector, then a sum (`linear`) or a TIES merge (`ties`).

    The drop masks of all tasks are drawn from one stream per tensor, so removing a task changes the others'
    masks: all remaining tasks are needed.
    """

    name = "dare"
    params_class = DareParams

    def merge_deltas(self, name: str, deltas: list[torch.Tensor]) -> TensorMerge:
        from peft.utils.merge_utils import dare_linear, dare_ties

        p = self.params
        weights = check_weights(p.weights, len(deltas)).to(deltas[0].dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tensor_seed(p.seed, name))
            if p.variant == "linear":
                merged = dare_linear(deltas, weights, p.density)
            else:
                merged = dare_ties(deltas, weights, p.density, majority_sign_method=p.majority_sign_method)
        return TensorMerge(merged if p.scaling == 1.0 else merged * p.scaling)

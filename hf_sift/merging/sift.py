"""SIFT-Masks as a merge method: the exact integer sum of task vectors with each task's sign mask.

Per tensor this computes what [`~hf_sift.MergedDelta`] holds: ``Q = Σ_t round(τ_t 2**S)`` in int64 (overflow is
raised, never wrapped) and ``m_t = 1{v ∘ τ_t > 0}`` for the seeded sign vector v. The plain merge of a tensor is
``θ0 + scale · Q 2**-S`` (scale defaults to 1/T), computed by `hf_sift.served_weights.served_tensor`, the one
function that computes served weights (so it keeps θ0's bits where nothing moved, as docs/FORMAT.md says).

`merge_checkpoints` does not write a plain checkpoint for this method: it writes a real SIFT artifact
(`hf_sift.merging.sift_artifact`), from which one task is removed exactly at the cost of that task alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..fixed_point import SCALE_BITS, check_no_overflow, quantize
from ..masks import agreement_mask
from ..served_weights import served_tensor
from ..sign_vector import SignVector
from .registry import REMOVAL_COST_ONE, MergeMethod, MergeParams, TensorMerge, register_method


@dataclass(frozen=True)
class SiftParams(MergeParams):
    """Parameters of the SIFT-Masks merge.

    Args:
        sign_seed (`int`, *optional*, defaults to 0): Seed of the sign vector v.
        scale_bits (`int`, *optional*, defaults to 40): The fixed-point scale S.
        scaling (`float`, *optional*): Scale of the plain merge; 1/T when omitted.
    """

    sign_seed: int = 0
    scale_bits: int = SCALE_BITS
    scaling: float | None = None


@register_method
class SiftMasks(MergeMethod):
    """Exact integer sum with per-task SIFT masks; supports exact removal at the cost of one task."""

    name = "sift"
    params_class = SiftParams
    supports_exact_removal = True
    removal_cost = REMOVAL_COST_ONE
    localizes = True

    def merge_tensor(self, name: str, base: torch.Tensor, tuned: Sequence[torch.Tensor]) -> TensorMerge:
        p = self.params
        positive = SignVector(p.sign_seed).positive(name, tuple(base.shape), base.device)
        total = torch.zeros(base.shape, dtype=torch.int64)
        masks = []
        for tensor in tuned:
            q = quantize(base, tensor, p.scale_bits, name)
            check_no_overflow(total, q, name)
            total += q
            masks.append(agreement_mask(q, positive))
        scale = 1.0 / len(tuned) if p.scaling is None else p.scaling
        return TensorMerge(served_tensor(base, total, scale=scale, scale_bits=p.scale_bits), masks)

"""Uniform soup: the plain average of the finetuned weights, θ = (1/N) Σ_t θ_t (Wortsman et al., 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .registry import REMOVAL_COST_ONE, MergeMethod, TensorMerge, compute_dtype, register_method


@register_method
class UniformSoup(MergeMethod):
    """The average of the finetuned models (no parameters). Linear in each model, so removal costs 1 model."""

    name = "soup"
    supports_exact_removal = True
    removal_cost = REMOVAL_COST_ONE

    def merge_tensor(self, name: str, base: torch.Tensor, tuned: Sequence[torch.Tensor]) -> TensorMerge:
        dtype = compute_dtype(base.dtype)
        total = torch.zeros(base.shape, dtype=dtype)
        for tensor in tuned:
            total += tensor.to(dtype)
        return TensorMerge((total / len(tuned)).to(base.dtype))

"""Task arithmetic (FT+Merge): θ = θ0 + λ Σ_t w_t τ_t (Ilharco et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import (
    REMOVAL_COST_ONE,
    MergeMethod,
    MergeParams,
    TensorMerge,
    check_weights,
    register_method,
)


@dataclass(frozen=True)
class TaskArithmeticParams(MergeParams):
    """Parameters of task arithmetic.

    Args:
        scaling (`float`, *optional*, defaults to 1.0): λ, applied to the weighted sum of task vectors.
        weights (`tuple[float, ...]`, *optional*): One weight per model; all ones when omitted.
    """

    scaling: float = 1.0
    weights: tuple[float, ...] | None = None


@register_method
class TaskArithmetic(MergeMethod):
    """Sum of the (weighted) task vectors, scaled by λ; computed by `peft.utils.merge_utils.task_arithmetic`.

    The merge is linear, so one task is removed by subtracting its (re-trained) task vector: cost 1.
    """

    name = "task_arithmetic"
    params_class = TaskArithmeticParams
    supports_exact_removal = True
    removal_cost = REMOVAL_COST_ONE

    def merge_deltas(self, name: str, deltas: list[torch.Tensor]) -> TensorMerge:
        from peft.utils.merge_utils import task_arithmetic

        weights = check_weights(self.params.weights, len(deltas)).to(deltas[0].dtype)
        merged = task_arithmetic(deltas, weights)
        return TensorMerge(merged if self.params.scaling == 1.0 else merged * self.params.scaling)

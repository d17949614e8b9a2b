"""MagMax: per element, the task vector entry of largest magnitude (Marczak et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import MergeMethod, MergeParams, TensorMerge, register_method


@dataclass(frozen=True)
class MagMaxParams(MergeParams):
    """Parameters of MagMax.

    Args:
        scaling (`float`, *optional*, defaults to 1.0): λ, applied to the selected task vector.
    """

    scaling: float = 1.0


@register_method
class MagMax(MergeMethod):
    """θ = θ0 + λ τ_max where τ_max takes, per element, the entry of the task with the largest |τ_t|.

    Ties in magnitude go to the first model. Removing a task can change every element it won, and what the
    others would have contributed there is gone: all remaining tasks are needed.
    """

    name = "magmax"
    params_class = MagMaxParams

    def merge_deltas(self, name: str, deltas: list[torch.Tensor]) -> TensorMerge:
        stacked = torch.stack(deltas)
        winner = stacked.abs().argmax(dim=0, keepdim=True)
        return TensorMerge(stacked.gather(0, winner).squeeze(0) * self.params.scaling)

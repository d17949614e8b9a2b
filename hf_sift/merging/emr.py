"""EMR-merging: elect, mask, rescale (Huang et al., 2024).

The unified task vector takes, per element, the elected sign ``γ = sgn(Σ_t τ_t)`` and the largest magnitude among
the tasks that agree with it. Each task keeps the mask ``M_t = 1{τ_t ∘ τ_uni > 0}`` and a rescaler
``λ_t = Σ|τ_t| / Σ|M_t ∘ τ_uni|`` (over every merged tensor). Task t is served as θ0 + λ_t (M_t ∘ τ_uni); the
written checkpoint is θ0 + τ_uni, with the masks bit-packed and the rescalers recorded next to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .registry import MergeMethod, TensorMerge, register_method


def elect_unified(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """τ_uni: the elected sign times the largest magnitude among the task vectors that agree with it."""
    stacked = torch.stack(list(deltas))
    sign = torch.sign(stacked.sum(dim=0))
    agreeing = stacked * sign > 0
    magnitude = torch.where(agreeing, stacked.abs(), torch.zeros((), dtype=stacked.dtype)).amax(dim=0)
    return sign * magnitude


@register_method
class EmrMerging(MergeMethod):
    """Unified task vector with per-task masks and rescalers (no parameters). The elected sign and maximum depend
    on every task: removal needs all remaining tasks.
    """

    name = "emr"
    localizes = True

    def begin(self, task_ids: Sequence[str]) -> None:
        super().begin(task_ids)
        self._own = [0.0] * len(task_ids)
        self._masked = [0.0] * len(task_ids)

    def merge_deltas(self, name: str, deltas: list[torch.Tensor]) -> TensorMerge:
        unified = elect_unified(deltas)
        masks = [d * unified > 0 for d in deltas]
        if getattr(self, "_own", None) is None or len(self._own) != len(deltas):
            self.begin([str(i) for i in range(len(deltas))])
        for i, (delta, mask) in enumerate(zip(deltas, masks)):
            self._own[i] += float(delta.abs().sum(dtype=torch.float64))
            self._masked[i] += float((unified.abs() * mask).sum(dtype=torch.float64))
        return TensorMerge(unified, masks)

    def rescalers(self) -> list[float]:
        """λ_t of each task over the tensors merged so far (1.0 where the mask is empty)."""
        return [own / masked if masked else 1.0 for own, masked in zip(self._own, self._masked)]

    def summary(self) -> dict[str, Any]:
        return {"rescalers": dict(zip(self.task_ids, self.rescalers()))}

"""TALL-masks: per-task masks over the multi-task vector (Wang et al., 2024).

τ_MTL = Σ_t τ_t and ``m_t = 1{|τ_t| >= λ |τ_MTL - τ_t|}``: an element belongs to task t when the task's own
update dominates what the other tasks add there. Task t is served as θ0 + α (m_t ∘ τ_MTL); the written checkpoint
is the multi-task model θ0 + α τ_MTL, with the per-task masks bit-packed next to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import (
    InvalidMergeParameterError,
    MergeMethod,
    MergeParams,
    TensorMerge,
    check_fraction,
    register_method,
)


@dataclass(frozen=True)
class TallMasksParams(MergeParams):
    """Parameters of TALL-masks.

    Args:
        threshold (`float`, *optional*, defaults to 0.4): λ of the mask rule (ignored when `density` is set).
        density (`float`, *optional*):
            Target fraction of each tensor in each task's mask: the entries with the largest ratio
            ``|τ_t| / |τ_MTL - τ_t|`` are kept, instead of thresholding at λ.
        scaling (`float`, *optional*, defaults to 1.0): α, the rescale of the multi-task vector.
    """

    threshold: float = 0.4
    density: float | None = None
    scaling: float = 1.0

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise InvalidMergeParameterError(f"threshold must be >= 0, got {self.threshold}")
        check_fraction(self.density, "density", allow_zero=True)


def tall_mask(delta: torch.Tensor, total: torch.Tensor, threshold: float, density: float | None) -> torch.Tensor:
    """The TALL mask of one task vector `delta` given the multi-task vector `total`."""
    own, others = delta.abs(), (total - delta).abs()
    if density is None:
        return own >= threshold * others
    keep = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    if keep:
        ratio = own.reshape(-1) / others.reshape(-1)  # x/0 = inf (kept first), 0/0 = nan (last)
        ratio = torch.nan_to_num(ratio, nan=-1.0)
        mask[torch.topk(ratio, keep).indices] = True
    return mask.view(delta.shape)


@register_method
class TallMasks(MergeMethod):
    """Task arithmetic plus one localising mask per task. Every mask depends on the sum over all tasks, so
    removing a task changes every other mask: all remaining tasks are needed.
    """

    name = "tall_masks"
    params_class = TallMasksParams
    localizes = True

    def merge_deltas(self, name: str, deltas: list[torch.Tensor]) -> TensorMerge:
        total = torch.stack(deltas).sum(dim=0)
        p = self.params
        masks = [tall_mask(d, total, p.threshold, p.density) for d in deltas]
        return TensorMerge(total * p.scaling, masks)

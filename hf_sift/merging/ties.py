"""TIES-merging: trim, elect sign, disjoint merge (Yadav et al., 2023), via `peft.utils.merge_utils.ties`."""

from __future__ import annotations

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
class TiesParams(MergeParams):
    """Parameters of TIES.

    Args:
        density (`float`, *optional*, defaults to 0.2): Fraction of each task vector kept (largest magnitudes).
        scaling (`float`, *optional*, defaults to 1.0): λ, applied to the merged task vector.
        weights (`tuple[float, ...]`, *optional*): One weight per model; all ones when omitted.
        majority_sign_method (`str`, *optional*, defaults to `"total"`):
            `"total"` elects the sign of the summed entries, `"frequency"` the most frequent sign.
    """

    density: float = 0.2
    scaling: float = 1.0
    weights: tuple[float, ...] | None = None
    majority_sign_method: Literal["total", "frequency"] = "total"

    def __post_init__(self) -> None:
        check_fraction(self.density, "density")


@register_method
class Ties(MergeMethod):
    """Keep the top-`density` entries of each task vector, elect a sign per element, average the entries that
    agree with it. The elected sign and the averages depend on every task: removal needs all remaining tasks.
    """

    name = "ties"
    params_class = TiesParams

    def merge_deltas(self, name: str, deltas: list[torch.Tensor]) -> TensorMerge:
        from peft.utils.merge_utils import ties

        weights = check_weights(self.params.weights, len(deltas)).to(deltas[0].dtype)
        p = self.params
        merged = ties(deltas, weights, p.density, majority_sign_method=p.majority_sign_method)
        return TensorMerge(merged if p.scaling == 1.0 else merged * p.scaling)

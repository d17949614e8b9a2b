"""NegMerge: machine unlearning by negating the sign-consensus of several forget-set task vectors (Kim et al., 2024).

K candidates are finetuned from the original model θ0 on the forget set (different hyper-parameters), giving
τ_1..τ_K. An element survives only where all K signs agree strictly (a zero breaks consensus); survivors are
averaged, the rest is zero: ``τ_neg = mean_k τ_k ∘ 1{consensus}``. The unlearned model is ``θ0 - λ τ_neg``.

[`negmerge_task_vector`] is the batch form over the K task vectors of one tensor; [`NegMergeAccumulator`] is the
streaming form that folds in one candidate at a time (a running float64 sum and a running sign tally), so the K
candidates never need to be in memory together. [`search_scaling`] picks λ as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ParameterMismatchError
from .registry import (
    InvalidMergeParameterError,
    MergeMethod,
    MergeParams,
    TensorMerge,
    compute_dtype,
    register_method,
)


def negmerge_task_vector(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Batch NegMerge of one tensor: the mean of `deltas` where all their signs agree strictly, zero elsewhere.

    The mean is summed in float64 and returned in the deltas' dtype.
    """
    if not deltas:
        raise InvalidMergeParameterError("NegMerge needs at least one task vector")
    stacked = torch.stack(list(deltas))
    signs = torch.sign(stacked)
    consensus = (signs == signs[0]).all(dim=0) & (signs[0] != 0)
    mean = stacked.to(torch.float64).sum(dim=0) / len(deltas)
    return torch.where(consensus, mean, torch.zeros((), dtype=torch.float64)).to(stacked.dtype)


@dataclass(frozen=True)
class NegMergeParams(MergeParams):
    """Parameters of NegMerge.

    Args:
        scaling (`float`, *optional*, defaults to 1.0): λ: the unlearned model is θ0 - λ τ_neg.
    """

    scaling: float = 1.0


@register_method
class NegMerge(MergeMethod):
    """θ0 - λ τ_neg from K candidates finetuned on a forget set (the "base" is the model to unlearn from).

    NegMerge removes data from one model rather than merging tasks; its consensus depends on every candidate.
    """

    name = "negmerge"
    params_class = NegMergeParams

    def merge_deltas(self, name: str, deltas: list[torch.Tensor]) -> TensorMerge:
        return TensorMerge(negmerge_task_vector(deltas) * -self.params.scaling)


class NegMergeAccumulator:
    """Streaming NegMerge: fold in forget-set candidates one at a time.

    Holds a float64 running sum and an int8 running consensus sign per tensor (the sign all candidates so far
    share, or 0 once any disagreed or was zero). The result equals [`negmerge_task_vector`] over all candidates.

    Args:
        original (`Mapping[str, torch.Tensor]`): θ0, the model to unlearn from (read, never modified).
        parameters (`Iterable[str]`, *optional*): Names to merge; every floating-point tensor by default.
    """

    def __init__(self, original: Mapping[str, torch.Tensor], parameters: Iterable[str] | None = None):
        names = sorted(n for n, t in original.items() if t.is_floating_point()) if parameters is None else None
        self.names = names if names is not None else sorted(set(parameters))
        missing = [n for n in self.names if n not in original]
        if missing:
            raise ParameterMismatchError(f"{len(missing)} parameter(s) are not in the original model: {missing[:3]}")
        self.original = original
        self.count = 0
        self._sum: dict[str, torch.Tensor] = {}
        self._sign: dict[str, torch.Tensor] = {}

    def add(self, candidate: Mapping[str, torch.Tensor]) -> None:
        """Fold in one finetuned candidate θ_k (only its task vector's sum and signs are kept)."""
        for name in self.names:
            if name not in candidate or tuple(candidate[name].shape) != tuple(self.original[name].shape):
                raise ParameterMismatchError(f"candidate lacks {name!r} or has another shape than the original")
        for name in self.names:
            base = self.original[name].detach().cpu()
            dtype = compute_dtype(base.dtype)
            delta = candidate[name].detach().cpu().to(dtype) - base.to(dtype)
            sign = torch.sign(delta).to(torch.int8)
            if self.count == 0:
                self._sum[name] = delta.to(torch.float64)
                self._sign[name] = sign
            else:
                self._sum[name] += delta
                self._sign[name] = torch.where(sign == self._sign[name], sign, torch.zeros((), dtype=torch.int8))
        self.count += 1

    def task_vector(self) -> dict[str, torch.Tensor]:
        """τ_neg per tensor, in the compute dtype of each original tensor."""
        if self.count == 0:
            raise InvalidMergeParameterError("no candidate has been added")
        out = {}
        for name in self.names:
            mean = self._sum[name] / self.count
            kept = torch.where(self._sign[name] != 0, mean, torch.zeros((), dtype=torch.float64))
            out[name] = kept.to(compute_dtype(self.original[name].dtype))
        return out

    def consensus_fraction(self) -> float:
        """Fraction of elements where every candidate agreed (the density of τ_neg's support)."""
        total = sum(t.numel() for t in self._sign.values())
        kept = sum(int((t != 0).sum()) for t in self._sign.values())
        return kept / total if total else 0.0


def negated_state_dict(
    original: Mapping[str, torch.Tensor], task_vector: Mapping[str, torch.Tensor], scaling: float
) -> dict[str, torch.Tensor]:
    """``θ0 - λ τ_neg`` for the tensors of `task_vector`; other entries of `original` are returned as is."""
    out = dict(original)
    for name, tau in task_vector.items():
        base = original[name].detach()
        out[name] = (base.to(tau.dtype) + tau * -scaling).to(base.dtype)
    return out


@torch.no_grad()
def apply_negation(
    model: torch.nn.Module,
    original: Mapping[str, torch.Tensor],
    task_vector: Mapping[str, torch.Tensor],
    scaling: float,
) -> None:
    """Set `model`'s weights to ``θ0 - λ τ_neg`` in place (tensors outside `task_vector` are reset to θ0)."""
    state = model.state_dict()
    for name, value in negated_state_dict(original, task_vector, scaling).items():
        if name in state:
            state[name].copy_(value)


@dataclass
class ScalingTrial:
    """One λ of the search: its forget and retain metrics and whether the retain constraint held."""

    scaling: float
    forget: float
    retain: float
    feasible: bool


@dataclass
class ScalingSearchResult:
    """The outcome of [`search_scaling`].

    Args:
        scaling (`float`): The chosen λ (0.0 when no λ of the grid kept the retain metric high enough).
        original_forget (`float`): Forget metric of the original model.
        original_retain (`float`): Retain metric of the original model.
        trials (`list[ScalingTrial]`): Every λ tried, in grid order.
    """

    scaling: float
    original_forget: float
    original_retain: float
    trials: list[ScalingTrial] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "scaling": self.scaling,
            "original_forget": self.original_forget,
            "original_retain": self.original_retain,
            "trials": [vars(t) for t in self.trials],
        }


def search_scaling(
    model: torch.nn.Module,
    original: Mapping[str, torch.Tensor],
    task_vector: Mapping[str, torch.Tensor],
    scalings: Sequence[float],
    evaluate: Callable[[torch.nn.Module], tuple[float, float]],
    retain_fraction: float = 0.95,
) -> ScalingSearchResult:
    """Pick λ: minimise the forget metric subject to retain >= `retain_fraction` x the original's retain.

    `model` is evaluated in place for each λ of the grid and left with the chosen λ applied.

    Args:
        model (`torch.nn.Module`): A model holding the original architecture (its weights are overwritten).
        original (`Mapping[str, torch.Tensor]`): θ0 (a copy, not `model`'s own tensors).
        task_vector (`Mapping[str, torch.Tensor]`): τ_neg, e.g. from [`NegMergeAccumulator.task_vector`].
        scalings (`Sequence[float]`): The λ grid.
        evaluate (`Callable[[torch.nn.Module], tuple[float, float]]`):
            Returns ``(forget_metric, retain_metric)``; lower forget is better, higher retain is better.
        retain_fraction (`float`, *optional*, defaults to 0.95): The retain constraint.
    """
    if not scalings:
        raise InvalidMergeParameterError("the λ grid is empty")
    apply_negation(model, original, task_vector, 0.0)
    original_forget, original_retain = (float(x) for x in evaluate(model))
    result = ScalingSearchResult(0.0, original_forget, original_retain)
    best: ScalingTrial | None = None
    for scaling in scalings:
        apply_negation(model, original, task_vector, float(scaling))
        forget, retain = (float(x) for x in evaluate(model))
        trial = ScalingTrial(float(scaling), forget, retain, retain >= retain_fraction * original_retain)
        result.trials.append(trial)
        if trial.feasible and (best is None or trial.forget < best.forget):
            best = trial
    result.scaling = best.scaling if best is not None else 0.0
    apply_negation(model, original, task_vector, result.scaling)
    return result

"""The exact integer form of task vectors.

A task vector is stored as ``q = round((float64(θ_t) - float64(θ0)) * 2**S)`` in int64, with one fixed scale
``S = SCALE_BITS`` chosen independently of any task. Sums of int64 are associative and invertible, which is what
makes removing a task exact. ``S = 40`` resolves updates down to 2**-40 ≈ 9.1e-13 (far below one fp32 ulp of
typical weights) and leaves room for the summed absolute update of an element to reach 2**23 before overflow,
which is detected and raised, never wrapped.
"""

from __future__ import annotations

import torch

from .errors import AccumulatorOverflowError


SCALE_BITS = 40
INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)


def quantize(base: torch.Tensor, tuned: torch.Tensor, scale_bits: int = SCALE_BITS, name: str = "") -> torch.Tensor:
    """``round((float64(tuned) - float64(base)) * 2**scale_bits)`` as int64, raising on overflow or NaN."""
    delta = tuned.detach().to(torch.float64) - base.detach().to(torch.float64)
    delta.mul_(2.0**scale_bits).round_()
    if delta.numel():
        if not torch.isfinite(delta).all():
            raise AccumulatorOverflowError(f"task vector of {name!r} is not finite (NaN or inf in the weights)")
        # 2**63 is exactly representable; anything at or beyond it does not fit in int64.
        if delta.abs().max().item() >= 2.0**63:
            raise AccumulatorOverflowError(f"task vector of {name!r} exceeds the int64 range at scale 2**{scale_bits}")
    return delta.to(torch.int64)


def max_abs(q: torch.Tensor) -> int:
    """Largest magnitude in an int64 tensor, as a Python int (0 for an empty tensor)."""
    if q.numel() == 0:
        return 0
    return max(int(q.max().item()), -int(q.min().item()))


def check_no_overflow(acc: torch.Tensor, q: torch.Tensor, name: str, sign: int = 1) -> None:
    """Raise [`AccumulatorOverflowError`] if ``acc + sign * q`` leaves the int64 range anywhere."""
    if sign < 0:
        if (q == INT64_MIN).any():
            raise AccumulatorOverflowError(f"integer sum of {name!r} would overflow int64")
        q = -q
    # The sum is kept within ±(2**63 - 1) (symmetric, so that -Q always exists). acc + q leaves it iff q > 0 and
    # acc > MAX - q, or q < 0 and acc < -MAX - q. Both right-hand sides are computed for every element; the
    # discarded branch may wrap, the selected one never does.
    over = torch.where(q > 0, acc > INT64_MAX - q, acc < -INT64_MAX - q)
    if over.any():
        raise AccumulatorOverflowError(
            f"integer sum of {name!r} would overflow int64 at {int(over.sum())} element(s); hf_sift never wraps"
        )

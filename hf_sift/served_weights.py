"""Served weights: the one place where θ0, the merged sum Q, a task's mask and the scale become weights.

[`served_tensor`] implements the arithmetic of docs/FORMAT.md ("Served weights") for one parameter, with the
fused kernels where they apply; [`~hf_sift.MergedDelta.materialize`], [`~hf_sift.MergedMaskedModel`], the `sift`
merge method and `task_state_dict` all call it, so they cannot disagree. [`serve`] and [`plain_weights`] write
them into a transformers model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from . import kernels
from .arena import empty_tensors
from .errors import InvalidArgumentError, InvalidScaleError, ServingDtypeError
from .masks import packed_size, select_bits_, unpack_bits
from .offload import offload_slots


if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .merged_delta import MergedDelta


# Elements served per step by the torch path; a multiple of 8 so mask bytes split cleanly.
_SERVE_CHUNK = 1 << 18


def check_scale(scale: float) -> float:
    """`scale` as a float, or [`~hf_sift.errors.InvalidScaleError`] if it is not a finite real number."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InvalidScaleError(f"scale must be a finite number, got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise InvalidScaleError(f"scale must be a finite number, got {scale!r}: the served weights would be {scale}")
    return scale


def served_tensor(
    base: torch.Tensor,
    total: torch.Tensor | None,
    packed_mask: torch.Tensor | None = None,
    *,
    scale: float,
    scale_bits: int,
    out: torch.Tensor | None = None,
    plain: torch.Tensor | None = None,
) -> torch.Tensor:
    """Served weights of one parameter (see docs/FORMAT.md).

    Wherever ``Q · m`` is 0 (the mask is 0, or nothing moved): θ0 cast to `out`'s dtype, bit for bit. Elsewhere:
    ``dtype(float64(θ0) + float64(Q) · (scale · 2**-S))``, evaluated in float64 in that order and rounded once to
    `out`'s dtype (default: the base's). The work runs in chunks with reused buffers, so the extra memory is a few
    MiB whatever the parameter's size; `out` may be `base` itself (in-place serving).

    Args:
        base (`torch.Tensor`): θ0 of the parameter.
        total (`torch.Tensor`, *optional*): The int64 sum Q of the parameter, same shape; may be `None` when `plain`
            is given (it is then not read).
        packed_mask (`torch.Tensor`, *optional*): The task's bit-packed mask; `None` serves the plain merge.
        scale (`float`): Scale of the merged update (1/T in the paper); must be finite.
        scale_bits (`int`): The fixed-point scale S.
        out (`torch.Tensor`, *optional*): Where to write; a new tensor like `base` by default.
        plain (`torch.Tensor`, *optional*): The plain-merge weights of this parameter computed earlier (same dtype
            as `out`); the masked result is then a bitwise select between `plain` and θ0, without touching Q: this
            is how a [`~hf_sift.MergedMaskedModel`] switches tasks in one cheap pass.
    """
    factor = check_scale(scale) * 2.0 ** (-scale_bits)
    if total is None and plain is None:
        raise InvalidArgumentError("served_tensor needs the sum or the plain-merge weights")
    total = None if total is None else total.reshape(-1)
    base_flat = base.detach().reshape(-1)
    if out is None:
        out = torch.empty_like(base)
    out_flat = out.view(-1)
    numel = out_flat.numel()
    if (factor == 0.0 and plain is None) or numel == 0:
        return out.copy_(base)
    # The masked term is computed as float64(±Q·m) · (∓factor) with the sign chosen so that a zero term is
    # -0.0: θ0 + (-0.0) is θ0 bit for bit (θ0 + 0.0 would turn -0.0 into +0.0). Q·m is masked as an integer
    # (exact), and ±Q never overflows since the sum stays within ±(2**63 - 1).
    negate = factor > 0
    # The fused kernels (one pass, threaded) give the same bits as the torch path below, which serves whatever
    # they do not support (other dtypes, devices or layouts, or a build without a C compiler).
    if plain is not None and packed_mask is not None:
        merged = plain.reshape(-1)
        if kernels.select_(out_flat, merged, base_flat, packed_mask):
            return out
    elif plain is None and kernels.serve_(
        out_flat, base_flat, total, packed_mask, -factor if negate else factor, negate
    ):
        return out
    if plain is None:  # reusable chunk buffers, only needed when Q is read
        size = min(_SERVE_CHUNK, numel)
        work = torch.empty(size, dtype=torch.int64, device=out.device)
        wide = torch.empty(size, dtype=torch.float64, device=out.device)
        bits = torch.empty(size, dtype=torch.int64, device=out.device) if packed_mask is not None else None
    for lo in range(0, numel, _SERVE_CHUNK):
        hi = min(lo + _SERVE_CHUNK, numel)
        keep = None
        if packed_mask is not None:
            keep = unpack_bits(packed_mask[lo // 8 : packed_size(hi)], hi - lo).to(out.device).view(torch.uint8)
        if plain is not None:
            merged = plain.reshape(-1)[lo:hi]
            if keep is None:
                out_flat[lo:hi].copy_(merged)
            else:
                select_bits_(out_flat[lo:hi], merged, base_flat[lo:hi].to(out.dtype), keep)
            continue
        q = work[: hi - lo]
        q.copy_(total[lo:hi])
        if negate:
            q.neg_()
        if keep is not None:
            m = bits[: hi - lo]
            m.copy_(keep).neg_()  # 1 -> all ones, 0 -> 0
            q.bitwise_and_(m)
        w = wide[: hi - lo]
        w.copy_(q).mul_(-factor if negate else factor).add_(base_flat[lo:hi])
        out_flat[lo:hi].copy_(w)
    return out


def is_finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def may_overflow(dtype: torch.dtype, delta: MergedDelta, scale: float) -> bool:
    """Whether serving into `dtype` can turn finite weights into inf, so the result must be checked.

    A served weight is θ0 plus an update below ``2**(63 - S) * |scale|`` in magnitude (Q is int64). Dtypes with
    the range of float32 (float32, bfloat16, float64) cannot overflow unless θ0 itself is within that bound of
    their largest value; narrower ones (float16, float8) are checked after every write.
    """
    return torch.finfo(dtype).max < 1e38 or 2.0 ** (63 - delta.scale_bits) * abs(scale) > 1e37


def check_cast(model: PreTrainedModel, base_state: Mapping[str, torch.Tensor], tuned: set[str]) -> None:
    """Raise if casting the base to the served dtype turned finite untuned weights into inf."""
    state = model.state_dict()
    slots = offload_slots(model, [n for n in state if n not in tuned])
    for name, tensor in state.items():
        if name in tuned or not tensor.is_floating_point():
            continue
        if is_finite(slots[name].read() if name in slots else tensor):  # offloaded ones are read one at a time
            continue
        if name in base_state and is_finite(base_state[name]):
            raise ServingDtypeError(
                f"{tensor.dtype} cannot hold the weights of {name!r} (they overflow to inf); use a wider dtype"
            )


def plain_weights(
    model: PreTrainedModel, delta: MergedDelta, base_weights: Mapping[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """The plain-merge weights of the tuned parameters in the served dtype, on the CPU (kept for switching)."""
    state = model.state_dict()
    buffers = empty_tensors([(state[n].shape, state[n].dtype) for n in delta.names])
    with kernels.deferred():
        return {
            name: served_tensor(base_weights[name], delta.sum[name], scale=scale, scale_bits=delta.scale_bits, out=out)
            for name, out in zip(delta.names, buffers)
        }


def serve(
    model: PreTrainedModel,
    delta: MergedDelta,
    base_weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None,
    scale: float,
    plain: Mapping[str, torch.Tensor] | None = None,
    fresh: bool = False,
) -> None:
    """Write the served weights into `model`, one parameter at a time.

    With `plain` (the plain-merge weights a switching model keeps), each parameter is a bitwise select between
    them and θ0 by the task's mask: Q is not read again. With `fresh`, the weights of CPU parameters go to new
    memory (see `hf_sift.arena`) that the parameters are then pointed at, leaving their previous storage (θ0, often
    a map of the checkpoint file) untouched, and new memory filled in huge pages is much faster to write than the
    copy-on-write pages of such a map; otherwise they are written in place.
    """
    state = model.state_dict(keep_vars=True)
    slots = offload_slots(model, delta.names)  # parameters that accelerate loads from a map at each forward
    groups: dict[tuple[object, object], list[str]] = {}
    for name in delta.names:  # tied weights share one storage: serve it once
        target = state[name]
        key = ("offloaded", name) if name in slots else (target.device, target.data_ptr())
        groups.setdefault(key, []).append(name)
    served = [names[0] for names in groups.values()]
    # Offloaded parameters always get new memory: what their map holds may be θ0 itself.
    renewed = [n for n in served if n in slots or (fresh and state[n].device.type == "cpu")]
    buffers = empty_tensors([(state[n].shape, state[n].dtype) for n in renewed]) if renewed else []
    outputs = dict(zip(renewed, buffers))
    # A non-finite served weight is an overflow unless θ0 was already non-finite (checked before writing, in case
    # `out` is θ0 itself), and only dtypes narrower than float32's range can overflow.
    checked = [n for n in served if may_overflow(state[n].dtype, delta, scale) and is_finite(base_weights[n])]
    on_device: list[tuple[torch.Tensor, torch.Tensor]] = []
    with kernels.deferred():  # one batched hand-off to the kernel threads for all parameters
        for name in served:
            target = state[name].detach()
            mask = None if masks is None else masks[name]
            merged = None if plain is None else plain[name]
            base = base_weights[name]
            if name in outputs or target.device.type == "cpu":
                out = outputs.get(name, target)
            else:  # computed on the CPU so that the bits do not depend on the device
                out = torch.empty(target.shape, dtype=target.dtype)
                on_device.append((target, out))
            total = None if merged is not None else delta.sum[name]  # with P at hand, Q is not read
            served_tensor(base, total, mask, scale=scale, scale_bits=delta.scale_bits, out=out, plain=merged)
    for target, out in on_device:
        target.copy_(out)
    for name in checked:
        served_weights = outputs.get(name, state[name].detach())
        if not is_finite(served_weights):
            raise ServingDtypeError(
                f"{served_weights.dtype} cannot hold the served weights of {name!r} (they overflow to inf); "
                "use a wider dtype"
            )
    with torch.no_grad():
        for names in groups.values():
            if names[0] in outputs:
                for name in names:
                    if name in slots:
                        slots[name].write(outputs[names[0]])
                    else:
                        state[name].data = outputs[names[0]]

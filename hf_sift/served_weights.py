"""Write the served weights of a merged SIFT delta into a transformers model (used by `MergedMaskedModel`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import PreTrainedModel

from . import kernels
from .arena import empty_tensors
from .errors import ServingDtypeError
from .merged_delta import MergedDelta
from .offload import offload_slots


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
            name: delta.served_parameter(name, base_weights[name], None, scale, out=out)
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
                delta.served_parameter(name, base, mask, scale, out=outputs.get(name, target), plain=merged)
            else:  # computed on the CPU so that the bits do not depend on the device
                out = torch.empty(target.shape, dtype=target.dtype)
                on_device.append((target, delta.served_parameter(name, base, mask, scale, out, merged)))
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

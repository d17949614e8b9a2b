"""Parameters that accelerate offloaded behind hooks: read their θ0 and write their served weights.

With a `device_map` that sends modules to `"disk"` (or to `"cpu"` next to an accelerator), transformers leaves their
parameters on the `meta` device and attaches an accelerate hook whose `weights_map` supplies the real tensors at
each forward. A served model must change what that map returns, not the meta placeholder: writing into the
placeholder does nothing, and the model would silently run on θ0. Served weights of offloaded parameters live in
CPU memory, in the map's in-memory state dict, which accelerate reads before the checkpoint on disk.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import torch

from .errors import UnsupportedOffloadError


@dataclass(frozen=True)
class OffloadSlot:
    """Where accelerate keeps an offloaded parameter: `store[key]` is what its hook loads at each forward."""

    weights_map: Mapping[str, torch.Tensor]
    local_name: str
    store: MutableMapping[str, torch.Tensor]
    key: str

    def read(self) -> torch.Tensor:
        """The tensor the hook would load now (θ0 before serving, the served weights after)."""
        return self.weights_map[self.local_name]

    def write(self, tensor: torch.Tensor) -> None:
        """Make the hook load `tensor` (a CPU tensor owned by the caller) from now on."""
        self.store[self.key] = tensor


def _weights_map(module: torch.nn.Module) -> Mapping[str, torch.Tensor] | None:
    """The weights map of the accelerate hook on `module` (or of the first in a chain of hooks that has one)."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    return next((h.weights_map for h in hooks if getattr(h, "weights_map", None) is not None), None)


def _store_of(weights_map: Mapping[str, torch.Tensor], name: str) -> tuple[MutableMapping[str, torch.Tensor], str]:
    """The mutable mapping that `weights_map` reads first, and the key `name` has in it."""
    dataset, prefix = getattr(weights_map, "dataset", None), getattr(weights_map, "prefix", None)
    if dataset is None or not isinstance(prefix, str):  # a plain mapping of the module's own tensors
        dataset, prefix = weights_map, ""
    # accelerate's OffloadedWeightsLoader looks in its `state_dict` before the files on disk.
    store = getattr(dataset, "state_dict", dataset)
    if not isinstance(store, MutableMapping):
        raise UnsupportedOffloadError(
            f"{name!r} is offloaded by a hook whose weights ({type(dataset).__name__}) cannot be replaced; "
            "use a device_map that keeps every tuned parameter on a device (e.g. device_map='cpu')"
        )
    return store, prefix


def offload_slots(model: torch.nn.Module, names: list[str]) -> dict[str, OffloadSlot]:
    """The offload slot of each parameter in `names` that sits on the `meta` device; raise if one has none."""
    state = model.state_dict(keep_vars=True)
    slots = {}
    for name in names:
        if state[name].device.type != "meta":
            continue
        parts = name.split(".")
        for depth in range(len(parts) - 1, -1, -1):  # innermost module first, as accelerate looks it up
            module = model.get_submodule(".".join(parts[:depth]))
            local_name = ".".join(parts[depth:])
            weights_map = _weights_map(module)
            if weights_map is not None:
                store, prefix = _store_of(weights_map, name)
                slots[name] = OffloadSlot(weights_map, local_name, store, prefix + local_name)
                break
        else:
            raise UnsupportedOffloadError(
                f"{name!r} is on the meta device with no accelerate hook to load it: the base model was not fully "
                "loaded, so its served weights cannot be computed"
            )
    return slots


def materialized(
    state: Mapping[str, torch.Tensor], slots: Mapping[str, OffloadSlot], names: list[str]
) -> dict[str, torch.Tensor]:
    """`state` restricted to `names`, with each offloaded parameter read from its slot onto the CPU."""
    return {n: (slots[n].read() if n in slots else state[n]).detach().to("cpu") for n in names}

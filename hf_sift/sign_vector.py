"""The global random sign vector v of SIFT-Masks.

v assigns +1 or -1 to every element of every tuned parameter. It is never stored: it is a pure function of
``(sign_seed, parameter name, element index)``, regenerated where it is needed, on the tensor's own device.

Generator (format version 1, pinned by golden-value tests):

1. ``name_key = first 8 bytes (little endian) of sha256(name as UTF-8)``
2. ``stream = mix64(name_key XOR mix64(sign_seed mod 2**64))``
3. for the element at flat (row-major) index ``i``: ``z = mix64(stream + (i + 1) * 0x9E3779B97F4A7C15 mod 2**64)``
4. ``v_i = +1`` if the top bit of ``z`` is set, else ``-1``

``mix64`` is the SplitMix64 finaliser. All arithmetic is on unsigned 64-bit integers modulo 2**64; the torch
implementation runs it on int64 tensors (two's-complement wrap-around, logical shifts emulated by masking), which
gives the same bits on every device, dtype, thread count and torch version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from .errors import InvalidArgumentError, InvalidArgumentTypeError


_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
# Elements generated per step: bounds the int64 temporaries to a few MiB whatever the parameter's size.
_CHUNK = 1 << 20


def _mix64(z: int) -> int:
    """SplitMix64 finaliser on Python integers (the reference the tensor code must match)."""
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _as_int64(value: int) -> int:
    """Reinterpret an unsigned 64-bit value as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right_logical(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64_(x: torch.Tensor) -> torch.Tensor:
    """In-place SplitMix64 finaliser on an int64 tensor holding unsigned 64-bit values."""
    x ^= _shift_right_logical(x, 30)
    x *= _as_int64(_MIX1)
    x ^= _shift_right_logical(x, 27)
    x *= _as_int64(_MIX2)
    # The last step, z ^ (z >> 31), never changes the top bit, which is all the sign needs.
    return x


def stream_key(sign_seed: int, name: str) -> int:
    """The unsigned 64-bit key of one parameter's sign stream."""
    name_key = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
    return _mix64(name_key ^ _mix64(sign_seed & _MASK64))


def reference_signs(sign_seed: int, name: str, indices: Sequence[int]) -> list[int]:
    """Pure-Python reference of the generator, for tests and for other implementations to check against."""
    key = stream_key(sign_seed, name)
    return [1 if _mix64((key + (i + 1) * _GAMMA) & _MASK64) >> 63 else -1 for i in indices]


class SignVector:
    """The ±1 sign vector v, regenerated on demand from a seed.

    Args:
        seed (`int`):
            The sign seed shared by every task of a merge. Any Python integer; it is taken modulo 2**64.

    Example:

    ```python
    >>> from hf_sift import SignVector
    >>> v = SignVector(seed=0)
    >>> v.for_parameter("model.layers.0.mlp.up_proj.weight", (4, 3), dtype=torch.float32)
    ```
    """

    def __init__(self, seed: int):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise InvalidArgumentTypeError(f"`seed` must be an int, got {type(seed).__name__}")
        self.seed = seed

    def __repr__(self) -> str:
        return f"SignVector(seed={self.seed})"

    def positive_chunk(
        self, name: str, start: int, stop: int, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Boolean tensor `v > 0` for flat element indices `start` to `stop` (exclusive) of parameter `name`.

        Generating a parameter in chunks gives exactly the same values as generating it whole.
        """
        if start < 0 or stop < start:
            raise InvalidArgumentError(f"invalid element range [{start}, {stop})")
        key = _as_int64(stream_key(self.seed, name))
        out = torch.empty(stop - start, dtype=torch.bool, device=device)
        for lo in range(start, stop, _CHUNK):
            hi = min(lo + _CHUNK, stop)
            x = torch.arange(lo + 1, hi + 1, dtype=torch.int64, device=device)
            x *= _as_int64(_GAMMA)
            x += key
            torch.lt(_mix64_(x), 0, out=out[lo - start : hi - start])
        return out

    def positive(
        self, name: str, shape: Sequence[int] | torch.Size, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Boolean tensor `v > 0` of the given shape for parameter `name` (cheaper than the ±1 form)."""
        numel = 1
        for dim in shape:
            numel *= int(dim)
        return self.positive_chunk(name, 0, numel, device=device).view(tuple(shape))

    def for_parameter(
        self,
        name: str,
        shape: Sequence[int] | torch.Size,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The ±1 sign tensor of parameter `name`.

        Args:
            name (`str`): The parameter's name in the model's state dict.
            shape (`tuple[int, ...]`): The parameter's shape.
            device (`torch.device`, *optional*): Where to generate it; defaults to the CPU.
            dtype (`torch.dtype`, *optional*, defaults to `torch.int8`): The values are exactly ±1 in every dtype.
        """
        positive = self.positive(name, shape, device=device)
        signs = torch.full(positive.shape, -1, dtype=dtype or torch.int8, device=positive.device)
        return signs.masked_fill_(positive, 1)

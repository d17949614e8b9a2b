"""Per-task masks m_t = 1{v * τ_t > 0}, stored at one bit per element.

Bit order: element ``8k + j`` of the flattened (row-major) tensor is bit ``j`` (least significant first) of byte
``k``; the last byte is padded with zero bits. The same layout serves every localisation method of
`hf_sift.merging`.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import ParameterMismatchError


def packed_size(numel: int) -> int:
    """Number of bytes a mask of `numel` elements packs into."""
    return (numel + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor of any shape into a flat uint8 tensor, one bit per element, on the same device."""
    flat = mask.reshape(-1).to(torch.bool)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    return _pack_bits_torch(flat)


def _pack_bits_torch(flat: torch.Tensor) -> torch.Tensor:
    """[`pack_bits`] of a flat boolean tensor in torch operations, for devices numpy cannot reach."""
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).to(torch.uint8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=flat.device)
    return (bits * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int, shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
    """Inverse of [`pack_bits`]: the first `numel` bits as a boolean tensor (reshaped to `shape` if given)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ParameterMismatchError(
            f"a packed mask is a 1-D uint8 tensor, got {packed.dtype} with shape {tuple(packed.shape)}"
        )
    if packed.numel() != packed_size(numel):
        raise ParameterMismatchError(
            f"a packed mask of {numel} elements has {packed_size(numel)} bytes, got {packed.numel()}"
        )
    if packed.device.type == "cpu":
        flat = torch.from_numpy(np.unpackbits(packed.numpy(), count=numel, bitorder="little").view(np.bool_))
    else:
        flat = _unpack_bits_torch(packed, numel)
    return flat.view(tuple(shape)) if shape is not None else flat


def _unpack_bits_torch(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """[`unpack_bits`] in torch operations, for devices numpy cannot reach."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).to(torch.bool).view(-1)[:numel]


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def select_bits_(out: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``out = where(bits, keep, drop)`` bit for bit, for flat tensors of one dtype (`bits`: 0/1 uint8).

    Written with integer bit operations on views of the values, which on CPU are several times faster than
    `torch.where` with a boolean condition. `out` may alias `keep` or `drop`.
    """
    int_dtype = _INT_OF_SIZE[out.element_size()]
    k, d = keep.view(int_dtype), drop.view(int_dtype)
    difference = torch.bitwise_xor(k, d)
    difference &= bits.to(int_dtype).neg_()  # 0 -> all zeros, 1 -> all ones
    return torch.bitwise_xor(d, difference, out=out.view(int_dtype)).view(out.dtype)


def agreement_mask(delta: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """``1{v * delta > 0}`` given ``positive = (v > 0)``: the entries that moved in the direction of v."""
    return torch.where(positive, delta > 0, delta < 0)


_BITS_PER_BYTE = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def popcount(packed: torch.Tensor) -> int:
    """Number of set bits in a packed mask."""
    return int(torch.bincount(packed.reshape(-1).to(torch.int64), minlength=256).cpu() @ _BITS_PER_BYTE)

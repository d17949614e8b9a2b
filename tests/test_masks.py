import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_sift import masks
from hf_sift.masks import agreement_mask, pack_bits, packed_size, popcount, unpack_bits


@given(st.integers(min_value=0, max_value=300), st.integers(min_value=0, max_value=2**31))
@settings(max_examples=60, deadline=None)
def test_round_trip_odd_sizes(numel, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(numel, generator=gen) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(numel)
    assert torch.equal(unpack_bits(packed, numel), mask)
    assert popcount(packed) == int(mask.sum())


def test_bit_order_is_lsb_first():
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[0, 3, 9]] = True
    assert pack_bits(mask).tolist() == [0b00001001, 0b00000010]


@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 1237])
def test_torch_path_matches_numpy_path(numel):
    # Off the CPU, masks are packed and unpacked by torch operations; run those very functions on CPU tensors and
    # compare them with the numpy path (and numpy's own bit order) that the CPU uses.
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < 0.5
    torch_packed = masks._pack_bits_torch(mask)
    assert torch_packed.dtype == torch.uint8
    assert torch.equal(torch_packed, pack_bits(mask))
    assert np.array_equal(np.packbits(mask.numpy(), bitorder="little"), torch_packed.numpy())
    assert torch.equal(masks._unpack_bits_torch(torch_packed, numel), mask)
    assert torch.equal(masks._unpack_bits_torch(torch_packed, numel), unpack_bits(torch_packed, numel))


def test_shape_is_restored():
    mask = torch.rand(3, 5, 7) > 0.5
    assert torch.equal(unpack_bits(pack_bits(mask), mask.numel(), mask.shape), mask)


def test_wrong_packed_size_is_refused():
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 30)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(4, dtype=torch.int32), 30)


def test_agreement_mask():
    delta = torch.tensor([1.0, -1.0, 0.0, 2.0, -3.0, 0.0])
    positive = torch.tensor([True, True, True, False, False, False])
    assert agreement_mask(delta, positive).tolist() == [True, False, False, False, True, False]

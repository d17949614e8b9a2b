import pytest
import torch

from hf_sift import SignVector
from hf_sift.sign_vector import reference_signs, stream_key


def as_text(signs) -> str:
    return "".join("+" if int(s) > 0 else "-" for s in signs)


# Pinned values of generator version 1. Changing them breaks every published artifact's masks and every replay.
GOLDEN = [
    (0, "model.layers.0.mlp.up_proj.weight", 0, 0x978931E7A4829327, "+------+-+---+-+-+++-+++-+---++-"),
    (0, "model.layers.0.mlp.up_proj.weight", 10**6, 0x978931E7A4829327, "-+--++-------++--+-+-++++--++---"),
    (42, "w", 0, 0xF47F2FDC098FFDC5, "-----++--+-+--------++--+-+++-++"),
    (2**64 - 1, "transformer.h.0.attn.c_attn.weight", 0, 0xB5B4DEF7BD5D3F55, "-++--+-+--+-+-+++-++-+++-++-++++"),
]


@pytest.mark.parametrize("seed,name,start,key,expected", GOLDEN)
def test_golden_values(seed, name, start, key, expected):
    assert stream_key(seed, name) == key
    assert as_text(reference_signs(seed, name, range(start, start + 32))) == expected
    chunk = SignVector(seed).positive_chunk(name, start, start + 32)
    assert as_text(chunk.to(torch.int8) * 2 - 1) == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8])
def test_same_values_in_every_dtype(dtype):
    v = SignVector(123)
    signs = v.for_parameter("layer.weight", (5, 7), dtype=dtype)
    assert signs.dtype == dtype and signs.shape == (5, 7)
    expected = torch.tensor(reference_signs(123, "layer.weight", range(35)), dtype=torch.float64).view(5, 7)
    assert torch.equal(signs.to(torch.float64), expected)


def test_tensor_generator_matches_reference_over_many_elements():
    v = SignVector(7)
    got = v.for_parameter("a.b", (3001,)).tolist()
    assert got == reference_signs(7, "a.b", range(3001))


def test_chunked_generation_equals_contiguous(monkeypatch):
    v = SignVector(5)
    whole = v.positive("big", (1000, 37))
    pieces = torch.cat([v.positive_chunk("big", lo, min(lo + 4099, 37000)) for lo in range(0, 37000, 4099)])
    assert torch.equal(whole.view(-1), pieces)
    # The internal step size must not matter either.
    monkeypatch.setattr("hf_sift.sign_vector._CHUNK", 1000)
    assert torch.equal(SignVector(5).positive("big", (1000, 37)), whole)


def test_thread_count_does_not_matter():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = SignVector(9).positive("x", (100_003,))
        torch.set_num_threads(max(2, before))
        many = SignVector(9).positive("x", (100_003,))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_names_and_seeds_give_independent_streams():
    a = SignVector(1).positive("p", (10_000,))
    b = SignVector(2).positive("p", (10_000,))
    c = SignVector(1).positive("q", (10_000,))
    for x, y in [(a, b), (a, c)]:
        agreement = (x == y).float().mean().item()
        assert 0.45 < agreement < 0.55  # independent fair coins agree about half the time
    assert 0.48 < a.float().mean().item() < 0.52


def test_empty_and_scalar_parameters():
    assert SignVector(0).for_parameter("s", ()).shape == ()
    assert SignVector(0).for_parameter("e", (0, 3)).numel() == 0


def test_bad_seed_type():
    with pytest.raises(TypeError):
        SignVector("0")  # type: ignore[arg-type]

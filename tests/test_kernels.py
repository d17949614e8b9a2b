"""The compiled serving kernels give exactly the bits of the documented float64 formula and of the torch path."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_sift import MergedDelta, TaskVector, kernels
from hf_sift.masks import pack_bits
from hf_sift.served_weights import served_tensor


needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason="hf_sift._kernels not built (no C compiler) or disabled"
)

EDGE_FLOATS = [0.0, -0.0, 1.0, -1.5, 1e-40, -1e-45, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan, 0.02, -0.013]
EDGE_INTS = [0, 1, -1, 2**40, -(2**40), 2**53 + 1, -(2**53) - 1, 2**62, 2**63 - 1, -(2**63) + 1, 123456789]


def reference(base: torch.Tensor, q: torch.Tensor, keep: torch.Tensor, factor: float) -> torch.Tensor:
    """docs/FORMAT.md: θ0 where Q·m = 0, else dtype(float64(θ0) + float64(Q) · factor); -0.0 term trick."""
    negate = factor > 0
    s = torch.where(keep, q.neg() if negate else q, 0)
    return (s.double() * (-factor if negate else factor) + base.double()).to(base.dtype)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits; for NaN in 16-bit floats only NaN-ness, whose bits torch's own conversions do not fix."""
    if a.dtype != b.dtype:
        return False
    if a.dtype in (torch.bfloat16, torch.float16):
        nan = a.isnan()
        return torch.equal(nan, b.isnan()) and torch.equal(bits_of(a)[~nan], bits_of(b)[~nan])
    return torch.equal(bits_of(a), bits_of(b))


@st.composite
def serve_case(draw):
    n = draw(st.integers(1, 40))
    base = draw(st.lists(st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(width=32)), min_size=n, max_size=n))
    q = draw(
        st.lists(st.one_of(st.sampled_from(EDGE_INTS), st.integers(-(2**63) + 1, 2**63 - 1)), min_size=n, max_size=n)
    )
    keep = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    factor = draw(st.sampled_from([2.0**-40, 2.0**-40 / 3, -(2.0**-40) / 7, 1.0, -1.0, 1e300, 2.0**-1074]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return (
        torch.tensor(base, dtype=torch.float32).to(dtype),
        torch.tensor(q, dtype=torch.int64),
        torch.tensor(keep, dtype=torch.bool),
        factor,
    )


@needs_kernels
@settings(max_examples=150, deadline=None)
@given(serve_case(), st.booleans())
def test_serve_matches_the_float64_formula(case, masked):
    base, q, keep, factor = case
    negate = factor > 0
    out = torch.empty_like(base)
    mask = pack_bits(keep) if masked else None
    assert kernels.serve_(out, base, q, mask, -factor if negate else factor, negate)
    expected = reference(base, q, keep if masked else torch.ones_like(keep), factor)
    assert same_bits(out, expected)
    # Wherever Q·m = 0 the served value is θ0 itself, bit for bit (NaN payloads aside in bfloat16).
    untouched = (~keep if masked else torch.zeros_like(keep)) | (q == 0)
    if base.dtype == torch.float32:
        assert torch.equal(bits_of(out)[untouched], bits_of(base)[untouched])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("numel", [1, 7, 64, 1000, 100_003])
def test_serve_split_over_threads_and_in_place(monkeypatch, dtype, numel):
    monkeypatch.setattr(kernels, "_PARALLEL_MIN", 1)  # split even small tensors over threads
    gen = torch.Generator().manual_seed(numel)
    base = (torch.randn(numel, generator=gen) * 0.02).to(dtype)
    q = torch.randint(-(2**45), 2**45, (numel,), generator=gen)
    keep = torch.rand(numel, generator=gen) < 0.5
    factor = 2.0**-40 / 3
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        out = base.clone()  # serve in place over θ0
        assert kernels.serve_(out, out, q, pack_bits(keep), -factor, True)
        assert same_bits(out, reference(base, q, keep, factor))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("numel", [1, 9, 63, 64, 65, 10_001])
def test_select_matches_where(monkeypatch, dtype, numel):
    monkeypatch.setattr(kernels, "_PARALLEL_MIN", 1)
    gen = torch.Generator().manual_seed(numel)
    keep_values = torch.randint(0, 255, (numel * 8,), dtype=torch.uint8, generator=gen).view(dtype)
    drop_values = torch.randint(0, 255, (numel * 8,), dtype=torch.uint8, generator=gen).view(dtype)
    keep_values, drop_values = keep_values[:numel].clone(), drop_values[:numel].clone()
    bits = torch.rand(numel, generator=gen) < 0.3
    expected = torch.where(bits, bits_of(keep_values), bits_of(drop_values))
    out = torch.empty_like(keep_values)
    assert kernels.select_(out, keep_values, drop_values, pack_bits(bits))
    assert torch.equal(bits_of(out), expected)
    shifted = torch.empty(numel + 1, dtype=dtype)[1:]  # not 16-byte aligned: no streaming stores
    assert kernels.select_(shifted, keep_values, drop_values, pack_bits(bits))
    assert torch.equal(bits_of(shifted), expected)
    aliased = drop_values.clone()  # out may alias drop
    assert kernels.select_(aliased, keep_values, aliased, pack_bits(bits))
    assert torch.equal(bits_of(aliased), expected)


def test_unsupported_inputs_fall_back():
    base = torch.zeros(16, dtype=torch.float16)
    q = torch.zeros(16, dtype=torch.int64)
    assert not kernels.serve_(torch.empty_like(base), base, q, None, 1.0, False)  # float16: torch path
    base32 = torch.zeros(16)
    assert not kernels.serve_(torch.empty(16, dtype=torch.bfloat16), base32, q, None, 1.0, False)  # dtype change
    assert not kernels.serve_(torch.empty(16), base32, q, torch.zeros(3, dtype=torch.uint8), 1.0, False)  # size
    strided = torch.zeros(32)[::2]
    assert not kernels.serve_(torch.empty(16), strided, q, None, 1.0, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_and_torch_path_serve_identical_bits(monkeypatch, dtype):
    """`MergedDelta.materialize` and the plain-merge select give the same bits with and without the kernels."""
    gen = torch.Generator().manual_seed(0)
    base = {"a": (torch.randn(300_001, generator=gen) * 0.02).to(dtype), "b": torch.randn(5, 3).to(dtype)}
    base["a"][:4] = torch.tensor([-0.0, 0.0, 1.0, -1.0])
    delta = MergedDelta(base, sign_seed=3)
    for i in range(3):
        tuned = {k: v + (torch.randn(v.shape, generator=gen) * 1e-3).to(dtype) for k, v in base.items()}
        delta.add(f"t{i}", TaskVector.from_state_dicts(base, tuned, sign_seed=3))

    def serve_all() -> list[torch.Tensor]:
        plain = delta.materialize(base)
        results = [plain, delta.materialize(base, task="t1"), delta.materialize(base, task="t2", scale=-0.7)]
        mask = delta.load_mask("t0")
        results += [
            served_tensor(
                base[n],
                delta.sum[n],
                mask[n],
                scale=delta.default_scale(),
                scale_bits=delta.scale_bits,
                plain=plain[n],
            )
            for n in delta.names
        ]
        return [t for r in results for t in (r.values() if isinstance(r, dict) else [r])]

    fast = serve_all()
    monkeypatch.setenv("HF_SIFT_DISABLE_KERNELS", "1")
    assert not kernels.available()
    slow = serve_all()
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert same_bits(a, b)


@pytest.mark.parametrize("shares", [1, 2, 3, 7])
def test_batch_segments_cover_every_element_once(shares):
    sizes = [5, 64, 1000, 3, 129, 70_001, 8]
    calls = [(None, (i,), n) for i, n in enumerate(sizes)]
    groups = kernels._segments(calls, shares)
    assert 1 <= len(groups) <= shares
    covered = {i: [] for i in range(len(sizes))}
    for group in groups:
        for _, (i,), lo, hi in group:
            assert lo % 64 == 0 and lo < hi  # whole mask bytes: a cut is never inside one
            covered[i].append((lo, hi))
    for i, n in enumerate(sizes):
        runs = sorted(covered[i])
        assert runs[0][0] == 0 and runs[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))


@needs_kernels
def test_deferred_calls_run_on_exit(monkeypatch):
    monkeypatch.setattr(kernels, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    gen = torch.Generator().manual_seed(1)
    sizes = [3, 1000, 64, 20_001, 9]
    bases = [torch.randn(n, generator=gen) for n in sizes]
    qs = [torch.randint(-(2**45), 2**45, (n,), generator=gen) for n in sizes]
    keeps = [torch.rand(n, generator=gen) < 0.5 for n in sizes]
    outs = [torch.full((n,), 7.0) for n in sizes]
    with kernels.deferred():
        for out, base, q, keep in zip(outs, bases, qs, keeps):
            assert kernels.serve_(out, base, q, pack_bits(keep), 2.0**-40, False)
        assert all(bool((out == 7.0).all()) for out in outs)  # queued, not yet run
    for out, base, q, keep in zip(outs, bases, qs, keeps):
        assert same_bits(out, reference(base, q, keep, 2.0**-40))
    with pytest.raises(RuntimeError), kernels.deferred():
        kernels.serve_(outs[0], bases[0], qs[0], None, 1.0, False)
        raise RuntimeError("dropped")
    assert same_bits(outs[0], reference(bases[0], qs[0], keeps[0], 2.0**-40))  # the queued call never ran

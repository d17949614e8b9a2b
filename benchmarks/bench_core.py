"""Throughput of the core SIFT algebra on ~100M tuned elements, relative to plain `torch.add` bandwidth.

Each operation's throughput is the bytes it must read and write (its essential traffic) per second, divided by
the bytes per second of `torch.add(a, b, out=c)` on fp32 tensors of the same total size, measured in the same
run. Target: >= 50% for add, remove and materialise.

    python benchmarks/bench_core.py [--elements 100_000_000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from hf_sift import MergedDelta, SignVector, TaskVector, kernels
from hf_sift.masks import pack_bits
from hf_sift.served_weights import served_tensor


def timed(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls, after one warm-up call (first-touch page faults, allocator)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_add_time(n: int, repeats: int) -> float:
    """Time of fp32 `torch.add(a, b, out=c)` over `n` elements (reads 8, writes 4 bytes per element)."""
    a, b, c = torch.randn(n), torch.randn(n), torch.empty(n)
    return timed(lambda: torch.add(a, b, out=c), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=100_000_000)
    parser.add_argument("--tensors", type=int, default=48, help="the elements are split over this many tensors")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    per = args.elements // args.tensors
    n = per * args.tensors
    gen = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(per, generator=gen) * 0.02 for i in range(args.tensors)}
    tuned = {k: v + torch.randn(per, generator=gen) * 1e-3 for k, v in base.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    print(f"elements: {n:,} in {args.tensors} tensors; compiled kernels: {kernels.available()}")

    # Reference bandwidth: fp32 c = a + b reads 8 and writes 4 bytes per element.
    add_time = reference_add_time(n, args.repeats)
    bandwidth = 12 * n / add_time
    print(f"torch.add fp32: {add_time:.3f} s, {bandwidth / 1e9:.2f} GB/s (reference)")

    start = time.perf_counter()
    tv = TaskVector.from_state_dicts(base, tuned, sign_seed=0, parameters=list(base))
    _ = tv.digest, tv.max_abs
    build_time = time.perf_counter() - start
    delta = MergedDelta(base, sign_seed=0, parameters=list(base))

    signs = SignVector(0)
    results = {
        # name: (seconds, essential bytes)
        "sign generation (bool out)": (
            timed(lambda: [signs.positive(k, (per,)) for k in base], args.repeats),
            n,
        ),
        "pack mask (bool -> bits)": (
            timed(lambda: [pack_bits(m) for m in [torch.ones(per, dtype=torch.bool)] * args.tensors], args.repeats),
            n + n / 8,
        ),
    }

    def add_remove() -> tuple[float, float]:
        start = time.perf_counter()
        delta.add("t", tv)
        mid = time.perf_counter()
        delta.remove("t", tv)
        return mid - start, time.perf_counter() - mid

    pairs = [add_remove() for _ in range(args.repeats)]
    results["add (Q += q, int64)"] = (statistics.median(p[0] for p in pairs), 24 * n)
    results["remove (Q -= q, int64)"] = (statistics.median(p[1] for p in pairs), 24 * n)
    delta.add("t", tv)
    out = {k: torch.empty_like(v) for k, v in base.items()}
    mask = delta.load_mask("t")
    scale = delta.default_scale()

    def materialise() -> None:
        for name in delta.names:
            served_tensor(
                base[name], delta.sum[name], mask[name], scale=scale, scale_bits=delta.scale_bits, out=out[name]
            )

    def materialise_plain() -> None:
        for name in delta.names:
            served_tensor(base[name], delta.sum[name], scale=scale, scale_bits=delta.scale_bits, out=out[name])

    # The fused kernels (hf_sift/_kernels.c) when built, and the pure-torch path they replace, side by side.
    paths = [("", "0")] + ([(", torch path", "1")] if kernels.available() else [])
    for label, disabled in paths:
        os.environ["HF_SIFT_DISABLE_KERNELS"] = disabled
        results[f"materialise (task mask, fp32 out{label})"] = (
            timed(materialise, args.repeats),
            n * (4 + 8 + 4 + 1 / 8),
        )
        results[f"materialise (plain merge{label})"] = (timed(materialise_plain, args.repeats), n * (4 + 8 + 4))
    os.environ.pop("HF_SIFT_DISABLE_KERNELS")

    print(f"\n{'operation':50s} {'seconds':>8s} {'GB/s':>7s} {'vs torch.add':>13s}")
    for name, (seconds, nbytes) in results.items():
        rate = nbytes / seconds
        print(f"{name:50s} {seconds:8.3f} {rate / 1e9:7.2f} {rate / bandwidth:12.0%}")
    print(f"\n(task vector construction incl. digest: {build_time:.2f} s, not part of add)")


if __name__ == "__main__":
    main()

"""Digest throughput: what hashing the sum and θ0 costs per load, for the hash functions hf_sift could use.

Run: ``python benchmarks/bench_digest.py [--megabytes 850] [--repeats 5]``

Hashes one buffer of random bytes (default: the size of SmolLM2-135M's int64 sum) with each function, single
stream, and prints seconds and GB/s (median of the repeats, after one warm-up call). hf_sift's digests are sha256 (docs/FORMAT.md); the
others are listed to size what a change of format would buy. BLAKE3 is timed only when the `blake3` package is
installed (it is not a dependency of hf_sift), once on one thread and once on every core.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_core import timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=int, default=850)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data = memoryview(os.urandom(1 << 20) * args.megabytes)
    functions: dict[str, Callable[[], object]] = {
        name: (lambda name=name: hashlib.new(name, data).digest()) for name in ("sha256", "sha512", "blake2b", "sha1")
    }
    try:
        import blake3
    except ImportError:
        print("blake3 not installed: skipped (pip install blake3)")
    else:
        functions["blake3 (1 thread)"] = lambda: blake3.blake3(data).digest()
        functions[f"blake3 ({os.cpu_count()} threads)"] = lambda: blake3.blake3(
            data, max_threads=blake3.blake3.AUTO
        ).digest()
    print(f"{args.megabytes} MB, {os.cpu_count()} CPU cores, median of {args.repeats}")
    reference = None
    for name, fn in functions.items():
        seconds = timed(fn, args.repeats)
        reference = reference or seconds
        print(
            f"{name:<22} {seconds:6.3f} s  {len(data) / seconds / 1e9:5.2f} GB/s  {reference / seconds:4.1f}x sha256"
        )


if __name__ == "__main__":
    main()

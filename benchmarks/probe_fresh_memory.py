"""Probe: the cost of writing fresh memory, right after other memory was freed and after the machine sat idle.

Run: ``PYTHONPATH=. python benchmarks/probe_fresh_memory.py [--megabytes 425] [--rounds 4]``

Serving writes the tuned weights to new memory (`hf_sift.arena`). On a virtual machine whose balloon driver
reports free pages to the host (Linux `page_reporting`), memory freed and left idle for about two seconds is
handed back to the host, and touching it again costs host page faults. This prints, per round, the time to
allocate and fill `--megabytes` of fresh memory right after freeing the same amount, and after freeing it and
waiting `--idle` seconds: the gap is that cost, which shows up as noise in load and first-switch timings.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from hf_sift.arena import empty_tensors


def fill_seconds(elements: int) -> float:
    start = time.perf_counter()
    (buffer,) = empty_tensors([((elements,), torch.float32)])
    buffer.fill_(1.0)
    seconds = time.perf_counter() - start
    del buffer
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=int, default=425)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--idle", type=float, default=3.0)
    args = parser.parse_args()
    elements = args.megabytes * 10**6 // 4
    order = Path("/sys/module/page_reporting/parameters/page_reporting_order")
    reporting = f"page_reporting_order {order.read_text().strip()}" if order.exists() else "no page_reporting module"
    print(f"{args.megabytes} MB of fresh fp32 memory per fill; {reporting}")
    right_after, after_idle = [], []
    for _ in range(args.rounds):
        fill_seconds(elements)
        right_after.append(fill_seconds(elements))
        time.sleep(args.idle)
        after_idle.append(fill_seconds(elements))
    print("right after a free:", [round(s, 3) for s in right_after], f"median {statistics.median(right_after):.3f} s")
    print(
        f"after {args.idle:g} s idle:  ",
        [round(s, 3) for s in after_idle],
        f"median {statistics.median(after_idle):.3f} s",
    )


if __name__ == "__main__":
    main()

"""Start-up time of the `hf-sift` command: `--help`, `--version`, every `COMMAND --help`, and `import hf_sift`.

Each command runs in a fresh interpreter (`python -m hf_sift.cli ...`, as the `hf-sift` script does), several times;
the table gives the median and the fastest run, next to a bare `python -c pass` measured in the same run. Target:
under 1 s for each, except `train --help`, whose flags are the fields of `SIFTConfig` (a `TrainingArguments`):
listing them imports transformers and torch.

    python benchmarks/bench_cli.py [--repeats 7] [--compare /path/to/another/checkout]

With `--compare`, the same commands also run with another checkout of hf_sift first on `PYTHONPATH` (e.g. the
commit before a change), side by side: the checkouts alternate run by run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
COMMANDS: list[tuple[str, list[str]]] = [
    ("python -c pass (interpreter alone)", ["-c", "pass"]),
    ("python -c 'import hf_sift'", ["-c", "import hf_sift"]),
    ("hf-sift --version", ["-m", "hf_sift.cli", "--version"]),
    ("hf-sift --help", ["-m", "hf_sift.cli", "--help"]),
    ("hf-sift merge --help", ["-m", "hf_sift.cli", "merge", "--help"]),
    ("hf-sift negmerge --help", ["-m", "hf_sift.cli", "negmerge", "--help"]),
    ("hf-sift export --help", ["-m", "hf_sift.cli", "export", "--help"]),
    ("hf-sift train --help (needs transformers)", ["-m", "hf_sift.cli", "train", "--help"]),
]


def run_once(args: list[str], checkout: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=checkout, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def run_times(args: list[str], checkouts: list[Path], repeats: int) -> list[list[float]]:
    """`repeats` timings per checkout, the checkouts alternating run by run so that a change of load hits all."""
    times: list[list[float]] = [[] for _ in checkouts]
    for _ in range(repeats):
        for i, checkout in enumerate(checkouts):
            times[i].append(run_once(args, checkout))
    return times


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compare", type=Path, help="another checkout of hf_sift, timed side by side")
    args = parser.parse_args()
    checkouts = [("this checkout", ROOT)] + ([("--compare", args.compare.resolve())] if args.compare else [])
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}")
    print(f"load average before: {os.getloadavg()[0]:.2f}; {args.repeats} runs each, seconds (median / fastest)\n")
    header = f"{'command':<44}" + "".join(f"{name:>22}" for name, _ in checkouts)
    print(header)
    for label, command in COMMANDS:
        timings = run_times(command, [checkout for _, checkout in checkouts], args.repeats)
        cells = [f"{statistics.median(times):.2f} / {min(times):.2f}" for times in timings]
        print(f"{label:<44}" + "".join(f"{c:>22}" for c in cells))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

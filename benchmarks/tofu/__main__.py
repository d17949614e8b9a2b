"""``python -m benchmarks.tofu --profile smoke|cpu|full``: run the TOFU reproduction of one profile."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from .profiles import PROFILES


REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tofu", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="smoke")
    parser.add_argument(
        "--data-dir", "--data_dir", type=Path, default=None, help="TOFU files (default ../shared/data/tofu)"
    )
    parser.add_argument(
        "--work-dir",
        "--work_dir",
        type=Path,
        default=None,
        help="checkpoints and caches (default outputs/tofu-<profile>)",
    )
    parser.add_argument("--results", type=Path, default=None, help="default benchmarks/results/tofu-<profile>.json")
    parser.add_argument("--plot", type=Path, default=None, help="default docs/tofu-<profile>.png")
    parser.add_argument(
        "--report-only",
        "--report_only",
        action="store_true",
        help="train nothing: write the results from the score cache of an earlier (possibly interrupted) run",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .data import default_data_dir

    profile = PROFILES[args.profile]
    data_dir = args.data_dir or default_data_dir()
    work_dir = args.work_dir or REPO / "outputs" / f"tofu-{profile.name}"
    results = args.results or REPO / "benchmarks" / "results" / f"tofu-{profile.name}.json"
    plot_path = args.plot or REPO / "docs" / f"tofu-{profile.name}.png"
    if not (data_dir / "full.json").is_file():
        print(
            f"tofu: error: no TOFU data in {data_dir} (expected ../shared/data/tofu beside the repository)",
            file=sys.stderr,
        )
        return 2

    from .study import run

    warnings.filterwarnings("ignore")
    logging.getLogger("hf_sift").setLevel(logging.WARNING)
    started = time.time()
    payload = run(profile, data_dir, work_dir, results, plot_path, args.report_only)
    print(f"\n{payload['table']}\n\nresults: {results}\nplot: {plot_path}\nwall time: {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

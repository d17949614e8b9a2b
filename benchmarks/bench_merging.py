"""Benchmark: hf_sift's streaming merges against mergekit (task_arithmetic, ties), side by side.

Fine-tunes are random task vectors (θ0 + noise) of two models: 8 of the tiny Llama of the tests and 3 of the real
SmolLM2-135M-Instruct (fp32, tied embeddings). Every merge runs in its own subprocess, which reports its peak RSS
(`resource.getrusage`) and its merge time; the parent measures the whole command (interpreter, imports, merge).
Outputs of the two tools are compared tensor by tensor.

mergekit lives in its own virtual environment (never the project's):

    python3 -m venv /work/mergekit-venv
    /work/mergekit-venv/bin/pip install torch==2.13.0 && /work/mergekit-venv/bin/pip install mergekit

Run:

    PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/bench_merging.py --mergekit-python /work/mergekit-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
DENSITY = 0.2


def run_one(tool: str, method: str, base: str, out: str, models: list[str]) -> None:
    """Child process: merge once, print a JSON line with timings and peak RSS."""
    start = time.perf_counter()
    if tool == "hf_sift":
        import peft.utils.merge_utils  # noqa: F401 (imported lazily by the merge; counted as import time here)

        from hf_sift.merging import merge_checkpoints

        imported = time.perf_counter()
        params = {"density": DENSITY} if method == "ties" else {}
        merge_checkpoints(method, base, models, out, params=params)
    else:
        import yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        imported = time.perf_counter()
        model_params = {"weight": 1.0, **({"density": DENSITY} if method == "ties" else {})}
        config = {
            "merge_method": method,
            "base_model": base,
            "models": [{"model": m, "parameters": model_params} for m in models],
            "dtype": "float32",
        }
        run_merge(
            MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(config))), out, MergeOptions(quiet=True)
        )
    done = time.perf_counter()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"import_s": imported - start, "merge_s": done - imported, "peak_rss_mib": peak_kib / 1024}))


def make_finetunes(work: Path, size: str, count: int) -> tuple[Path, list[Path]]:
    """Base checkpoint and `count` random fine-tunes (cached in `work`)."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = work / size
    base = folder / "base"
    models = [folder / f"ft{i}" for i in range(count)]
    if all((m / "config.json").exists() for m in models):
        return base, models
    folder.mkdir(parents=True, exist_ok=True)
    if size == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import tiny_llama_config
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(tiny_llama_config()).save_pretrained(base)
        source = base
    else:
        from real_model import smollm2_path

        source = smollm2_path()
        if not base.exists():
            shutil.copytree(source, base)
    state = load_file(source / "model.safetensors")
    for i, model in enumerate(models):
        gen = torch.Generator().manual_seed(1000 + i)
        tuned = {n: t + 1e-3 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in state.items()}
        model.mkdir(parents=True, exist_ok=True)
        save_file(tuned, model / "model.safetensors", metadata={"format": "pt"})
        for name in os.listdir(source):
            if not name.endswith(".safetensors"):
                shutil.copy2(source / name, model / name)
        del tuned
    return base, models


def compare(out_a: Path, out_b: Path) -> dict:
    """Tensor-by-tensor agreement of two merged checkpoints."""
    sys.path.insert(0, str(REPO))
    from hf_sift.merging import CheckpointReader

    a, b = CheckpointReader(out_a), CheckpointReader(out_b)
    names = sorted(set(a.names()) | set(b.names()))
    equal, max_abs, missing = 0, 0.0, []
    for name in names:
        if name not in a or name not in b:
            missing.append(name)
            continue
        x, y = a.get(name).float(), b.get(name).float()
        diff = float((x - y).abs().max()) if x.numel() else 0.0
        equal += int(diff == 0.0)
        max_abs = max(max_abs, diff)
    return {"tensors": len(names), "bitwise_equal": equal, "max_abs_diff": max_abs, "missing": missing}


def timed_run(python: str, tool: str, method: str, base: Path, out: Path, models: list[Path]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [python, str(HERE), "--child", tool, method, str(base), str(out), *map(str, models)]
    env = {**os.environ, "PYTHONPATH": str(REPO) if tool == "hf_sift" else ""}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} {method} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-python", default="/work/mergekit-venv/bin/python")
    parser.add_argument("--work", default="/tmp/hf_sift_bench_merging")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="tiny,smollm2")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    work = Path(args.work)
    counts = {"tiny": 8, "smollm2": 3}
    rows = []
    for size in args.sizes.split(","):
        base, models = make_finetunes(work, size, counts[size])
        for method in ("task_arithmetic", "ties"):
            runs: dict[str, list[dict]] = {"hf_sift": [], "mergekit": []}
            for repeat in range(args.repeats):
                order = ("hf_sift", "mergekit") if repeat % 2 == 0 else ("mergekit", "hf_sift")
                for tool in order:
                    python = sys.executable if tool == "hf_sift" else args.mergekit_python
                    runs[tool].append(
                        timed_run(python, tool, method, base, work / f"out-{size}-{method}-{tool}", models)
                    )
            agreement = compare(work / f"out-{size}-{method}-hf_sift", work / f"out-{size}-{method}-mergekit")
            med = {t: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for t, rs in runs.items()}
            row = {
                "size": size,
                "models": len(models),
                "method": method,
                **{f"{t}_{k}": round(v, 3) for t, m in med.items() for k, v in m.items()},
                "wall_ratio": round(med["hf_sift"]["wall_s"] / med["mergekit"]["wall_s"], 3),
                "merge_ratio": round(med["hf_sift"]["merge_s"] / med["mergekit"]["merge_s"], 3),
                "rss_ratio": round(med["hf_sift"]["peak_rss_mib"] / med["mergekit"]["peak_rss_mib"], 3),
                **agreement,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| model | N | method | hf_sift wall s | mergekit wall s | wall ratio | hf_sift merge s | mergekit merge s "
          "| merge ratio | hf_sift peak RSS MiB | mergekit peak RSS MiB | bitwise-equal tensors | max abs diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['models']} | {r['method']} | {r['hf_sift_wall_s']} | {r['mergekit_wall_s']} | "
            f"{r['wall_ratio']}x | {r['hf_sift_merge_s']} | {r['mergekit_merge_s']} | {r['merge_ratio']}x | "
            f"{r['hf_sift_peak_rss_mib']:.0f} | {r['mergekit_peak_rss_mib']:.0f} | "
            f"{r['bitwise_equal']}/{r['tensors']} | {r['max_abs_diff']:.3g} |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        run_one(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:])
    else:
        main()

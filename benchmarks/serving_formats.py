"""Format 1 vs format 2 serving, side by side in one run (`bench_serving.py --compare-formats`).

For SmolLM2-135M in fp32 and in a bf16 copy, the same synthetic merge of N tasks (one sum, the same masks, hard-linked)
is saved as format 1 (sum only) and format 2 (sum + plain merge P). Each row measures, interleaved with the plain
model's own figures:

- load one task (`MergedMaskedModel.from_pretrained`, default `keep_delta=True`) vs plain `from_pretrained`, alone
  and followed by one forward pass;
- bytes read to serve one task in a fresh process with the files evicted from the page cache (`read_bytes`), and
  the sizes of the artifact/base files it opened (strace);
- resident memory after loading with `keep_delta=False` (single task) and with `keep_delta=True` after one switch
  (switching mode), vs the plain model;
- `set_task` vs one elementwise pass (``θ0 + Δ`` written into the parameters) in the served dtype;
- artifact bytes on disk, and bytes a publisher uploads per unlearning (every file a save rewrites: config,
  manifest, the sum, and P in format 2; the other masks are unchanged).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_sift import MergedDelta, MergedMaskedModel


def bf16_base(workdir: Path, base_path: Path) -> Path:
    """A bf16 copy of the base checkpoint (made once)."""
    target = workdir / "SmolLM2-135M-Instruct-bf16"
    if not (target / "model.safetensors").exists():
        AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16).save_pretrained(target)
    return target


def artifacts(workdir: Path, v1_fp32: Path, base_fp32: Path, tasks: int) -> dict[tuple[str, int], tuple[Path, Path]]:
    """(dtype, format) -> (artifact, base): the fp32 format-1 artifact and three more sharing its sum and masks."""
    base_bf16 = bf16_base(workdir, base_fp32)
    v1_bf16 = workdir / f"smollm2_{tasks}_tasks_bf16_v1"
    if not v1_bf16.exists():  # the same sum and masks on the bf16 base (masks hard-linked by the save)
        source = MergedDelta.from_pretrained(v1_fp32, verify=False)
        delta = MergedDelta(load_file(base_bf16 / "model.safetensors"), sign_seed=source.sign_seed)
        delta.base_model = str(base_bf16)
        delta._sum, delta._bounds = source._sum, dict.fromkeys(source.names, 2**30)
        delta._records, delta._masks = source._records, source._masks
        delta.save_pretrained(v1_bf16, base=None)
    found = {}
    for dtype, v1, base in (("fp32", v1_fp32, base_fp32), ("bf16", v1_bf16, base_bf16)):
        v2 = v1.with_name(v1.name.removesuffix("_v1") + "_v2")
        if not v2.exists():
            MergedDelta.from_pretrained(v1, verify=False).save_pretrained(v2, base=str(base))
        found[(dtype, 1)], found[(dtype, 2)] = (v1, base), (v2, base)
    return found


def disk_bytes(folder: Path) -> tuple[int, int]:
    """Bytes of the whole artifact, and of the files a save rewrites (all but the masks)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    rewritten = sum(p.stat().st_size for p in files if p.parent.name != "masks")
    return total, rewritten


def switch_figures(artifact: Path, tasks: list[str], repeats: int, timed) -> dict[str, float]:
    """`set_task` (after the first switch) against one elementwise pass over the tuned parameters, interleaved.

    Each repeat times one switch to a task not served before, then one pass, so both see the same machine load;
    returns the medians, the minima and the median of the per-repeat ratios (seconds, and x).
    """
    model = MergedMaskedModel.from_pretrained(artifact, task=tasks[1])
    weights, params = model._base_weights, model.model.state_dict()
    names = sorted(weights)
    step = {n: torch.randn(weights[n].shape).to(weights[n].dtype) for n in names}

    def one_pass():
        for n in names:
            torch.add(weights[n], step[n], out=params[n])

    model.set_task(tasks[2])  # the first switch (format 1 computes the plain merge here)
    one_pass()  # touch θ0 and the step once
    switches, passes = [], []
    for task in tasks[4 : 4 + repeats]:
        switches.append(timed(lambda task=task: model.set_task(task))[0])
        passes.append(timed(one_pass)[0])
    ratios = [a / b for a, b in zip(switches, passes)]
    return {
        "set_task": statistics.median(switches),
        "one_pass": statistics.median(passes),
        "set_task_min": min(switches),
        "one_pass_min": min(passes),
        "ratio": statistics.median(ratios),
        "ratio_min": min(switches) / min(passes),
    }


def switch_only(workdir: Path, v1_fp32: Path, base_fp32: Path, tasks: list[str], repeats: int, timed) -> None:
    """Only `set_task` vs one pass, for both formats in fp32 and bf16 (`bench_serving.py --switch-only`)."""
    combos = artifacts(workdir, v1_fp32, base_fp32, len(tasks))
    print(f"\n== set_task vs one elementwise pass, {repeats} interleaved repeats ==")
    for (dtype, fmt), (art, _) in sorted(combos.items()):
        f = switch_figures(art, tasks, repeats, timed)
        print(
            f"[{dtype}] format {fmt}: set_task median {f['set_task']:.4f} s (min {f['set_task_min']:.4f}), "
            f"one pass median {f['one_pass']:.4f} s (min {f['one_pass_min']:.4f}); "
            f"ratio median of pairs {f['ratio']:.2f}x, min/min {f['ratio_min']:.2f}x"
        )


def compare(workdir: Path, v1_fp32: Path, base_fp32: Path, tasks: list[str], repeats: int, run_child, timed) -> None:
    combos = artifacts(workdir, v1_fp32, base_fp32, len(tasks))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])

    def forward(model):
        with torch.no_grad():
            model(ids)
        return model

    print("\n== format 1 vs format 2 (same merge, same masks) ==")
    for dtype in ("fp32", "bf16"):
        base = combos[(dtype, 1)][1]
        plain = {m: run_child(m, combos[(dtype, 1)][0], base, tasks[3]) for m in ("plain",)}["plain"]
        children = {
            fmt: {m: run_child(m, combos[(dtype, fmt)][0], base, tasks[3]) for m in ("keep_delta", "drop_delta")}
            for fmt in (1, 2)
        }
        times: dict[str, list[float]] = {}
        loaders = {
            "plain": lambda base=base: AutoModelForCausalLM.from_pretrained(base, dtype="auto"),
            "plain+fwd": lambda base=base: forward(AutoModelForCausalLM.from_pretrained(base, dtype="auto")),
        }
        for fmt in (1, 2):
            art = combos[(dtype, fmt)][0]
            loaders[f"v{fmt}"] = lambda art=art: MergedMaskedModel.from_pretrained(art, task=tasks[1])
            loaders[f"v{fmt}+fwd"] = lambda art=art: forward(MergedMaskedModel.from_pretrained(art, task=tasks[1]))
        for load in loaders.values():  # warm the page cache once
            load()
        for _ in range(repeats):
            for kind, load in loaders.items():
                times.setdefault(kind, []).append(timed(load)[0])
        t = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n[{dtype}] load times (s), every repeat:", {k: [round(x, 3) for x in v] for k, v in times.items()})
        print(
            f"[{dtype}] plain: load {t['plain']:.3f} s, load+fwd {t['plain+fwd']:.3f} s, RSS {plain['rss'] / 1e6:.0f} MB, read {plain['read_bytes'] / 1e6:.1f} MB"
        )
        for fmt in (1, 2):
            art = combos[(dtype, fmt)][0]
            keep, drop = children[fmt]["keep_delta"], children[fmt]["drop_delta"]
            figures = switch_figures(art, tasks, repeats, timed)
            switch, one = figures["set_task"], figures["one_pass"]
            total, rewritten = disk_bytes(art)
            opened = f", files opened {drop['opened_bytes'] / 1e6:.1f} MB" if "opened_bytes" in drop else ""
            print(
                f"[{dtype}] format {fmt}: load {t[f'v{fmt}']:.3f} s = {t[f'v{fmt}'] / t['plain']:.2f}x plain; "
                f"load+fwd {t[f'v{fmt}+fwd']:.3f} s = {t[f'v{fmt}+fwd'] / t['plain+fwd']:.2f}x plain+fwd; "
                f"read {drop['read_bytes'] / 1e6:.1f} MB{opened}; "
                f"RSS single-task {drop['rss'] / 1e6:.0f} MB = {drop['rss'] / plain['rss']:.2f}x, "
                f"switching {keep['rss_after_switch'] / 1e6:.0f} MB = {keep['rss_after_switch'] / plain['rss']:.2f}x; "
                f"set_task {switch:.3f} s = {switch / one:.2f}x one pass ({one:.3f} s); "
                f"on disk {total / 1e9:.2f} GB, uploaded per unlearning {rewritten / 1e6:.0f} MB"
            )

"""A diagnostic of SIFT-Masks' served scale, on the artifact a profile's run left (forward passes only).

SIFT-Masks serves author t as ``θ0 + scale · m_t ∘ Σ_i τ_i``. hf_sift's default scale is 1/T, the mean of the task
vectors as in FT+Merge, and the merging study reports SIFT-Masks at that scale. Under the mask, an entry that only
author t moved is then served at 1/T of t's own update; at scale 1 it is served at t's own value, and an entry that
several authors moved (all with the same sign) at their sum. This script measures each author's answer probability
under its own mask at several scales of the merge of all T authors, next to local FT and SIFT local from the run's
score cache. It explains the merging study's figures; it is not how they are obtained (they keep the default).
The held-out row serves each author at the scale that did best on the other half of the authors (two folds), so
that no author's own score chooses the scale it is measured at. Two more measurements explain the 1/T figure: how
many authors' masks hold each entry of an author's mask (`mask_statistics`), and a serving rule with no scale to
choose, each masked entry divided by the number of authors whose masks hold it (the mean of the authors that moved
it, TIES' "disjoint mean"; `count_normalised_merge`). Neither is what hf_sift serves.

    python -m benchmarks.tofu.serving_scale --profile cpu [--scales 0.125 0.5 1]

Writes ``benchmarks/results/tofu-<profile>-serving-scale.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_sift import MergedDelta, MergedMaskedModel
from hf_sift.masks import unpack_bits

from .data import default_data_dir, load_authors
from .experiment import Scorer
from .models import base_folder, load_model, load_tokenizer
from .profiles import PROFILES
from .report import machine


REPO = Path(__file__).resolve().parents[2]


def default_scales(count: int) -> list[float]:
    """1/T, 2/T, 4/T, ... up to 1."""
    scales, factor = [], 1
    while factor < count:
        scales.append(factor / count)
        factor *= 2
    return scales + [1.0]


def held_out_choice(per_scale: dict[str, dict[str, float]], ids: list[str]) -> dict[str, str]:
    """For each author, the scale chosen on the *other* half of the authors (two folds: first half, second half).

    The chosen scale has the highest mean answer probability over the selecting half (the smaller scale on a tie),
    so no author's own score enters the choice of the scale it is evaluated at.
    """
    half = len(ids) // 2
    folds = [(ids[half:], ids[:half]), (ids[:half], ids[half:])]  # (selecting authors, evaluated authors)
    chosen: dict[str, str] = {}
    for selecting, evaluated in folds:
        best = max(per_scale, key=lambda s: (sum(per_scale[s][a] for a in selecting), -float(s)))
        chosen.update(dict.fromkeys(evaluated, best))
    return chosen


def mask_counts(delta: MergedDelta) -> dict[str, torch.Tensor]:
    """For each tuned entry, how many merged tasks' masks hold it (int16; a sum of masks, like Q a sum of vectors)."""
    counts = {name: torch.zeros(delta.shapes[name], dtype=torch.int16) for name in delta.names}
    for task_id in delta.task_ids:
        with delta.open_mask(task_id) as masks:
            for name, count in counts.items():
                count += unpack_bits(masks[name], count.numel(), count.shape)
    return counts


def mask_statistics(delta: MergedDelta, counts: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per task: its mask's density, and the mean share of the T tasks whose masks hold each entry of its mask.

    At the default scale 1/T, an entry of t's mask is served at (sum of the same-signed updates of the tasks that
    moved it) / T: with updates of equal size that is `share` times t's own.
    """
    total = sum(count.numel() for count in counts.values())
    statistics = {}
    for task_id in delta.task_ids:
        held = covered = 0
        with delta.open_mask(task_id) as masks:
            for name, count in counts.items():
                mask = unpack_bits(masks[name], count.numel(), count.shape)
                held += int(mask.sum())
                covered += int(count[mask].sum(dtype=torch.int64))
        statistics[task_id] = {
            "density": held / total,
            "share": covered / (held * delta.num_tasks) if held else 0.0,
        }
    return statistics


def count_normalised_merge(
    delta: MergedDelta, base: dict[str, torch.Tensor], counts: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Every tuned entry at Q / (number of masks holding it): a diagnostic rule, computed once for all tasks.

    ``dtype(float64(θ0) + float64(Q) · 2**-S / count)`` where Q is not 0, θ0 bit for bit where it is.
    """
    unit = 2.0 ** (-delta.scale_bits)
    merged = {}
    for name in delta.names:
        theta0, total = base[name], delta.sum[name]
        count = counts[name].clamp(min=1).to(torch.float64)
        moved = (theta0.to(torch.float64) + total.to(torch.float64) * unit / count).to(theta0.dtype)
        merged[name] = torch.where(total != 0, moved, theta0)
    return merged


def count_normalised_weights(
    delta: MergedDelta, base: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], task_id: str
) -> dict[str, torch.Tensor]:
    """Tuned weights of `task_id` under the count-normalised rule: [`count_normalised_merge`] where t's mask is 1,
    θ0 bit for bit elsewhere. With one merged task this is the library's masked serving at scale 1, bit for bit
    (tested)."""
    weights = {}
    with delta.open_mask(task_id) as masks:
        for name in delta.names:
            theta0 = base[name]
            weights[name] = torch.where(unpack_bits(masks[name], theta0.numel(), theta0.shape), merged[name], theta0)
    return weights


def measure(profile_name: str, work_dir: Path, data_dir: Path, scales: list[float] | None) -> dict[str, Any]:
    """Each author's answer probability under its own mask, at each scale, from the run in `work_dir`."""
    profile = PROFILES[profile_name]
    artifact = work_dir / "sift-merged"
    cache_path = work_dir / "scores.json"
    if not (artifact / "sift_config.json").is_file() or not cache_path.is_file():
        raise FileNotFoundError(f"no finished SIFT phase in {work_dir}: run `python -m benchmarks.tofu` first")
    authors = load_authors(data_dir, list(profile.authors))
    base_dir = base_folder(profile.model, work_dir, authors)
    scorer = Scorer(load_tokenizer(base_dir), authors, profile.max_new_tokens)
    cache = json.loads(cache_path.read_text())
    count = len(authors)
    scales = scales or default_scales(count)
    started = time.perf_counter()
    per_scale: dict[str, dict[str, float]] = {}
    for scale in tqdm(scales, desc="served scale", unit="scale"):
        served = MergedMaskedModel.from_pretrained(artifact, task=None, base_model=base_dir, scale=scale)
        scores = {}
        for author in authors:
            served.set_task(author.task_id)
            scores[author.task_id] = scorer(served, author.task_id, full=False)["answer_probability"]
        per_scale[repr(scale)] = scores
        del served

    delta = MergedDelta.from_pretrained(artifact)
    counts = mask_counts(delta)
    model = load_model(base_dir)
    parameters = dict(model.named_parameters())
    base = {name: parameters[name].detach().clone() for name in delta.names}
    merged = count_normalised_merge(delta, base, counts)
    normalised = {}
    with torch.no_grad():
        for author in tqdm(authors, desc="count-normalised", unit="author"):
            for name, weight in count_normalised_weights(delta, base, merged, author.task_id).items():
                parameters[name].copy_(weight)
            normalised[author.task_id] = scorer(model, author.task_id, full=False)["answer_probability"]
    statistics = mask_statistics(delta, counts)
    del model, base, counts, merged

    def mean(values: dict[str, float]) -> float:
        return sum(values.values()) / len(values)

    def probabilities(key: str) -> dict[str, float]:
        return {t: s["answer_probability"] for t, s in cache[key].items()}

    ids = [a.task_id for a in authors]
    chosen = held_out_choice(per_scale, ids)
    local = probabilities("local FT")
    served_held_out = {t: per_scale[chosen[t]][t] for t in ids}
    held_out = {"chosen_scale": chosen, "authors": served_held_out, "mean": mean(served_held_out)}
    reference = {
        "local FT": mean(local),
        "SIFT local": mean(probabilities("SIFT local")),
        f"SIFT-Masks (the study, scale 1/{count})": mean(probabilities(f"SIFT-Masks@{count}")),
        f"FT+Merge (T = {count})": mean(probabilities(f"FT+Merge@{count}")) if f"FT+Merge@{count}" in cache else None,
    }
    return {
        "schema": "hf_sift tofu serving-scale diagnostic v2 (benchmarks/tofu/serving_scale.py)",
        "profile": profile_name,
        "merged_authors": count,
        "machine": machine(),
        "reference": reference,
        "scales": {s: {"mean": mean(v), "authors": v} for s, v in per_scale.items()},
        "held_out": held_out,
        "count_normalised": {"mean": mean(normalised), "authors": normalised},
        "masks": {
            "density": mean({t: v["density"] for t, v in statistics.items()}),
            "share": mean({t: v["share"] for t, v in statistics.items()}),
            "authors": statistics,
        },
        "local_ft_authors": local,
        "seconds": time.perf_counter() - started,
    }


def table(result: dict[str, Any]) -> str:
    """Markdown: the mean answer probability at each scale, and its ratio to local FT."""
    local = result["reference"]["local FT"]
    count = result["merged_authors"]
    lines = ["| model | answer probability | / local FT |", "|---|---|---|"]
    for label, value in result["reference"].items():
        if value is not None:
            lines.append(f"| {label} | {value:.3f} | {value / local:.2f}x |")
    for scale, values in result["scales"].items():
        label = f"SIFT-Masks, T = {count}, scale {float(scale) * count:g}/{count}"
        lines.append(f"| {label} | {values['mean']:.3f} | {values['mean'] / local:.2f}x |")
    held_out = result["held_out"]
    scales = sorted({f"{float(s) * count:g}/{count}" for s in held_out["chosen_scale"].values()})
    lines.append(
        f"| SIFT-Masks, T = {count}, scale chosen on the other half of the authors ({', '.join(scales)}) | "
        f"{held_out['mean']:.3f} | {held_out['mean'] / local:.2f}x |"
    )
    normalised = result["count_normalised"]["mean"]
    lines.append(
        f"| SIFT-Masks, T = {count}, each entry / its mask count | {normalised:.3f} | {normalised / local:.2f}x |"
    )
    masks = result["masks"]
    lines.append(
        f"\nmasks: mean density {masks['density']:.3f}; an entry of an author's mask is in {masks['share']:.3f} of "
        f"the {count} masks on average"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tofu.serving_scale", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--work-dir", "--work_dir", type=Path, default=None, help="default outputs/tofu-<profile>")
    parser.add_argument("--data-dir", "--data_dir", type=Path, default=None, help="default ../shared/data/tofu")
    parser.add_argument("--scales", type=float, nargs="+", default=None, help="default 1/T, 2/T, 4/T, ..., 1")
    parser.add_argument(
        "--results", type=Path, default=None, help="default benchmarks/results/tofu-<p>-serving-scale.json"
    )
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    if profile.threads is not None:
        torch.set_num_threads(profile.threads)
    work_dir = args.work_dir or REPO / "outputs" / f"tofu-{profile.name}"
    results = args.results or REPO / "benchmarks" / "results" / f"tofu-{profile.name}-serving-scale.json"
    try:
        result = measure(profile.name, work_dir, args.data_dir or default_data_dir(), args.scales)
    except FileNotFoundError as err:
        print(f"serving_scale: error: {err}")
        return 2
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{table(result)}\n\nresults: {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

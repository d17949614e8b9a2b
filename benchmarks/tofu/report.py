"""Results of the TOFU benchmark: the JSON records, the curve against T, and the table at the largest T."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from .profiles import Profile


METHOD_ORDER = [
    "zero-shot",
    "local FT",
    "FT+Merge",
    "SIFT local",
    "SIFT+Merge",
    "SIFT-Masks",
    "TALL-masks",
    "TIES",
    "EMR-merging",
    "Central FT",
]
PER_AUTHOR_MODELS = ("zero-shot", "local FT", "SIFT local")  # one model per author whatever T
METRICS = ("answer_probability", "rouge_l_recall", "truth_ratio")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(method: str, count: int, scores: dict[str, dict[str, Any]], ids: list[str]) -> dict[str, Any]:
    """One record: the metrics averaged over the first `count` authors (each scored by the model serving it)."""
    chosen = {t: scores[t] for t in ids[:count]}
    record: dict[str, Any] = {"method": method, "T": count}
    for metric in METRICS:
        values = [s[metric] for s in chosen.values() if metric in s]
        record[metric] = _mean(values) if len(values) == len(chosen) else None
    record["authors"] = {t: {m: s[m] for m in (*METRICS, "example") if m in s} for t, s in chosen.items()}
    return record


def build_records(profile: Profile, ids: list[str], scores: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (method, T) record of the merging study, in METHOD_ORDER then T order."""
    counts, largest = profile.merge_counts, profile.merge_counts[-1]
    records = []
    for method in METHOD_ORDER:
        for count in counts:
            source = scores.get(method) if method in PER_AUTHOR_MODELS else scores.get(f"{method}@{count}")
            if source is None or any(t not in source for t in ids[:count]):
                continue  # not scored yet (a partial report, or a profile grown by authors)
            record = aggregate(method, count, source, ids)
            if count != largest:  # ROUGE-L and truth ratio are measured at the largest T only
                record["rouge_l_recall"] = record["truth_ratio"] = None
                for author in record["authors"].values():
                    for key in ("rouge_l_recall", "truth_ratio", "example"):
                        author.pop(key, None)
            records.append(record)
    return records


def machine() -> dict[str, Any]:
    """The machine a run used: CPU model (lscpu), cores, torch and transformers versions."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    staging.replace(path)


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Answer probability against the number of merged authors T (the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method in METHOD_ORDER:
        points = [(r["T"], r["answer_probability"]) for r in records if r["method"] == method]
        if not points:
            continue
        xs, ys = zip(*points)
        style = {"marker": "o", "linewidth": 2.2 if method == "SIFT-Masks" else 1.2}
        if method in ("zero-shot", "local FT", "SIFT local"):
            style["linestyle"] = "--"
        if len(xs) == 1:
            style["marker"] = "*"
            style["markersize"] = 11
        ax.plot(xs, ys, label=method, **style)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("merged authors T")
    ax.set_ylabel("answer probability (own authors)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_unlearning(unlearning: dict[str, Any], path: Path, title: str) -> None:
    """Cumulative finetuning steps against unlearning requests, per method (the paper's Figure 9)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    # Methods with the same steps per request would hide each other: one line each, every method named.
    lines: dict[tuple[int, ...], dict[str, bool]] = {}
    for method, entries in unlearning["requests"].items():
        lines.setdefault(tuple(e["cumulative_steps"] for e in entries), {})[method] = bool(entries[0]["measured"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for ys, methods in lines.items():
        style = {"marker": "o", "linewidth": 2.2 if "SIFT-Masks" in methods else 1.2}
        if not any(methods.values()):
            style["linestyle"] = "--"
        measured = [m for m, flag in methods.items() if flag]
        estimated = [m for m, flag in methods.items() if not flag]
        parts = [f"{', '.join(measured)} (measured)"] if measured else []
        parts += [f"{', '.join(estimated)} (from training times)"] if estimated else []
        ax.plot(range(1, len(ys) + 1), list(ys), label="; ".join(parts), **style)
    ax.set_xticks(range(1, len(unlearning["forgotten"]) + 1))
    ax.set_xlabel("unlearning requests (one author each)")
    ax.set_ylabel("cumulative finetuning steps")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def table(records: list[dict[str, Any]], largest: int) -> str:
    """Markdown table of every method at the largest T, with the ratio to local FT's answer probability."""
    rows = [r for r in records if r["T"] == largest]
    local = next((r["answer_probability"] for r in rows if r["method"] == "local FT"), None)

    def fmt(value: float | None) -> str:
        return "—" if value is None else f"{value:.3f}"

    lines = [
        f"| method (T = {largest}) | answer probability | vs local FT | ROUGE-L recall | truth ratio |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["answer_probability"] / local if local else None
        lines.append(
            f"| {r['method']} | {fmt(r['answer_probability'])} | {fmt(ratio)} | "
            f"{fmt(r['rouge_l_recall'])} | {fmt(r['truth_ratio'])} |"
        )
    return "\n".join(lines)


def unlearning_plot_path(plot_path: Path) -> Path:
    """Where the unlearning plot goes: beside the curve, `-unlearning` added to its name."""
    return plot_path.with_name(f"{plot_path.stem}-unlearning{plot_path.suffix}")


def unlearning_table(unlearning: dict[str, Any]) -> str:
    """Markdown tables of the unlearning study: cost per request, then forget quality and model utility."""

    def fmt(value: Any, digits: int = 3) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    requests = unlearning["requests"]
    forgotten = unlearning["forgotten"]
    head = " | ".join(f"request {i + 1} ({t})" for i, t in enumerate(forgotten))
    lines = [f"| method | {head} | cumulative |", "|---" * (len(forgotten) + 2) + "|"]
    for method, entries in requests.items():
        cells = " | ".join(f"{e['steps']} steps, {e['seconds']:.0f} s" for e in entries)
        last = entries[-1]
        how = "measured" if entries[0]["measured"] else "from the training times"
        lines.append(
            f"| {method} ({how}) | {cells} | {last['cumulative_steps']} steps, {last['cumulative_seconds']:.0f} s |"
        )
    same = unlearning["sift_masks_identical_to_retain_only"]
    lines += [
        "",
        f"SIFT-Masks after unlearning {', '.join(forgotten)}: sum digest {same['digest_after_unlearning'][:23]}…, "
        f"never trained on them {same['digest_never_trained'][:23]}…; every artifact file equal (log aside): "
        f"{same['files_equal']}",
        "",
        "| model | forget quality (KS p) | forget truth ratio | model utility | forget questions |",
        "|---|---|---|---|---|",
    ]
    for label, values in unlearning["models"].items():
        lines.append(
            f"| {label} | {fmt(values['forget_quality'], 4)} | {fmt(values['forget_truth_ratio'])} | "
            f"{fmt(values['model_utility'])} | {values.get('forget_questions', '—')} |"
        )
    return "\n".join(lines)

"""One profile end to end: data, base model, the merging and unlearning studies, then the JSON, plot and tables."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .data import load_authors, load_general
from .experiment import MERGES, ScoreCache, Scorer, run_merging_study
from .models import base_folder, load_tokenizer
from .profiles import Profile
from .report import (
    build_records,
    machine,
    plot,
    plot_unlearning,
    table,
    unlearning_plot_path,
    unlearning_table,
    write_json,
)
from .unlearning import run_unlearning_study


def run(
    profile: Profile, data_dir: Path, work_dir: Path, results: Path, plot_path: Path, report_only: bool = False
) -> dict[str, Any]:
    """Run `profile` and write `results` (JSON) and `plot_path` (PNG); returns the JSON payload (+ the table).

    With `report_only`, nothing is trained: the results come from the score cache of an earlier, possibly
    interrupted, run (`complete` says whether every record is there).
    """
    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    if profile.threads is not None:
        torch.set_num_threads(profile.threads)
    work_dir.mkdir(parents=True, exist_ok=True)
    authors = load_authors(data_dir, list(profile.authors))
    base_dir = base_folder(profile.model, work_dir, authors)
    tokenizer = load_tokenizer(base_dir)
    scorer = Scorer(tokenizer, authors, profile.max_new_tokens, profile.table_questions)
    started = time.time()
    ids = [a.task_id for a in authors]
    cache = ScoreCache(work_dir / "scores.json")  # one cache for every phase: each put rewrites the whole file

    def report() -> dict[str, Any]:
        """Write the JSON and the plot from what the score cache holds now (partial until `complete`)."""
        scores = cache.data
        records = build_records(profile, ids, scores)
        # zero-shot, local FT, SIFT local, SIFT+Merge and SIFT-Masks, the profile's merges at every T; Central FT once
        merges = len(MERGES) if profile.merges is None else len(profile.merges)
        expected = (5 + merges) * len(profile.merge_counts) + int(profile.central)
        payload: dict[str, Any] = {
            "schema": "hf_sift tofu benchmark v1 (docs/tofu.md)",
            "profile": profile.to_dict(),
            "model": str(base_dir) if profile.model == "tiny" else "SmolLM2-135M-Instruct (offline GGUF, converted)",
            "machine": machine(),
            "complete": len(records) == expected and (profile.forget == 0 or scores.get("unlearning") is not None),
            "records": records,
            "training": {
                key: scores[key]
                for key in ("local FT training", "SIFT training", "Central FT training")
                if key in scores
            },
            "unlearning": scores.get("unlearning"),
            "wall_seconds": None if report_only else time.time() - started,
        }
        write_json(results, payload)
        title = f"TOFU, {profile.name} profile: {len(ids)} authors, {profile.steps} step(s) per author"
        plot(records, plot_path, title)
        if payload["unlearning"] is not None:
            plot_unlearning(payload["unlearning"], unlearning_plot_path(plot_path), f"{title}: unlearning cost")
        return payload

    def after_phase(phase: str) -> None:
        # The unlearning study runs as soon as the SIFT artifact and the local FT models exist, so that an
        # interrupted run still has it; partial results are written after every phase.
        if phase == "sift" and profile.forget > 0 and cache.get("unlearning") is None:
            general = [load_general(data_dir, n, profile.utility_questions) for n in ("real_authors", "world_facts")]
            unlearning = run_unlearning_study(
                profile, base_dir, tokenizer, authors, general, work_dir, scorer, cache.data
            )
            cache.put("unlearning", unlearning)
        report()

    if not report_only:
        run_merging_study(profile, base_dir, tokenizer, authors, work_dir, scorer, cache, after_phase)
    payload = report()
    records = payload["records"]
    tables = table(records, profile.merge_counts[-1])
    if payload["unlearning"] is not None:
        tables += "\n\n" + unlearning_table(payload["unlearning"])
    return {**payload, "table": tables}

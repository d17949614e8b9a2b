"""One profile end to end: data, base model, the merging study, then the JSON, the plot and the table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .data import load_authors
from .experiment import ScoreCache, Scorer, run_merging_study
from .models import base_folder, load_tokenizer
from .profiles import Profile
from .report import build_records, machine, plot, table, write_json


def run(
    profile: Profile, data_dir: Path, work_dir: Path, results: Path, plot_path: Path, report_only: bool = False
) -> dict[str, Any]:
    """Run `profile` and write `results` (JSON) and `plot_path` (PNG); returns the JSON payload (+ the table).

    With `report_only`, nothing is trained: the results come from the score cache of an earlier, possibly
    interrupted, run (`complete` says whether every record is there).
    """
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    work_dir.mkdir(parents=True, exist_ok=True)
    authors = load_authors(data_dir, list(profile.authors))
    base_dir = base_folder(profile.model, work_dir, authors)
    tokenizer = load_tokenizer(base_dir)
    scorer = Scorer(tokenizer, authors, profile.max_new_tokens, profile.table_questions)
    started = time.time()
    if report_only:
        scores = ScoreCache(work_dir / "scores.json").data
    else:
        scores = run_merging_study(profile, base_dir, tokenizer, authors, work_dir, scorer)
    ids = [a.task_id for a in authors]
    records = build_records(profile, ids, scores)
    expected = 9 * len(profile.merge_counts) + int(profile.central)
    payload: dict[str, Any] = {
        "schema": "hf_sift tofu benchmark v1 (docs/tofu.md)",
        "profile": profile.to_dict(),
        "model": str(base_dir) if profile.model == "tiny" else "SmolLM2-135M-Instruct (offline GGUF, converted)",
        "machine": machine(),
        "complete": len(records) == expected,
        "records": records,
        "training": {
            key: scores[key] for key in ("local FT training", "SIFT training", "Central FT training") if key in scores
        },
        "wall_seconds": None if report_only else time.time() - started,
    }
    write_json(results, payload)
    plot(records, plot_path, f"TOFU, {profile.name} profile: {len(ids)} authors, {profile.steps} step(s) per author")
    return {**payload, "table": table(records, profile.merge_counts[-1])}

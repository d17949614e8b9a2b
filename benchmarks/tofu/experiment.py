"""The merging study: every method at T = 1, 2, 4, ... merged authors, scored on each author's own pairs.

Per-author scores are cached as JSON in the work folder, so an interrupted run resumes where it stopped (the SIFT
artifact resumes by itself: `train_tasks` skips the authors it already holds).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hf_sift import MergedMaskedModel, ParameterSelection, train_tasks
from hf_sift.merging import merge_checkpoints, task_state_dict

from . import metrics
from .data import Author, PadCollator, training_dataset
from .models import load_model
from .profiles import Profile
from .training import ScoreWhenTrained, load_tuned, sift_config, snapshot, train_plain, tuned_names


# (method name in the results, registry name, parameters; T is filled in where a method scales by 1/T)
MERGES = {
    "FT+Merge": "task_arithmetic",
    "TIES": "ties",
    "TALL-masks": "tall_masks",
    "EMR-merging": "emr",
}


class Scorer:
    """Scores a model on one author: answer probability always; ROUGE-L and truth ratio when `full`."""

    def __init__(self, tokenizer: Any, authors: list[Author], max_new_tokens: int, table_questions: int | None = None):
        self.tokenizer = tokenizer
        self.authors = {a.task_id: a for a in authors}
        self.max_new_tokens = max_new_tokens
        self.table_questions = table_questions

    def __call__(self, model: Any, task_id: str, full: bool = True) -> dict[str, Any]:
        author, tok = self.authors[task_id], self.tokenizer
        losses = metrics.answer_losses(model, tok, author.questions, author.answers)
        scores: dict[str, Any] = {"answer_probability": metrics.probability(losses)}
        if not full:
            return scores
        n = self.table_questions or len(author.questions)
        questions = author.questions[:n]
        generations = metrics.greedy_answers(model, tok, questions, self.max_new_tokens)
        recalls = metrics.rouge_l_recalls(author.answers[:n], generations)
        scores["rouge_l_recall"] = sum(recalls) / len(recalls)
        scores["example"] = {"question": questions[0], "answer": author.answers[0], "generated": generations[0]}
        if author.perturbed is not None:
            reference = metrics.answer_losses(model, tok, questions, author.paraphrased[:n])
            wrong = metrics.perturbed_losses(model, tok, questions, author.perturbed[:n])
            ratios = metrics.truth_ratios(reference, wrong)
            scores["truth_ratio"] = metrics.truth_ratio_score(ratios)
            scores["truth_ratios"] = ratios
        return scores


class ScoreCache:
    """Per-author scores of each (method, T), kept in one JSON file of the work folder."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        staging = self.path.with_suffix(".tmp")
        staging.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        staging.replace(self.path)


def run_merging_study(
    profile: Profile,
    base_dir: Path,
    tokenizer: Any,
    authors: list[Author],
    work_dir: Path,
    scorer: Scorer,
    cache: ScoreCache,
    after_phase: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train, merge and score every method; returns the per-author scores and the training costs.

    `after_phase` is called with `"local"`, `"sift"`, `"baselines"` and `"central"` as each phase ends (its scores
    are in `cache` by then): the study writes partial results there, and runs the unlearning study after `"sift"`.
    """
    done = after_phase or (lambda phase: None)
    ids = [a.task_id for a in authors]
    counts, largest = profile.merge_counts, profile.merge_counts[-1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = PadCollator(pad)
    dataset = training_dataset(tokenizer, authors)
    model = load_model(base_dir)
    names = tuned_names(model)
    theta0 = snapshot(model, names)

    zero_shot = cache.get("zero-shot") or {}
    missing = [t for t in ids if t not in zero_shot]  # a profile grown by authors scores only the new ones
    if missing:
        zero_shot.update({t: scorer(model, t) for t in tqdm(missing, desc="zero-shot", unit="author")})
        cache.put("zero-shot", zero_shot)

    # Local FT: each author's own unconstrained model, kept (tuned tensors only) for the merges.
    ft_dir = work_dir / "local-ft"
    local, costs = cache.get("local FT") or {}, cache.get("local FT training") or {}
    for task_id in tqdm(ids, desc="local FT", unit="author"):
        if task_id in local and (ft_dir / task_id / "model.safetensors").is_file():
            continue
        subset = dataset.select([i for i, t in enumerate(dataset["author"]) if t == task_id])
        costs[task_id] = train_plain(model, subset, collator, profile, work_dir / "runs", task_id)
        local[task_id] = scorer(model, task_id)
        (ft_dir / task_id).mkdir(parents=True, exist_ok=True)
        tuned = {n: p.detach().contiguous() for n, p in model.named_parameters() if n in set(names)}
        save_file(tuned, ft_dir / task_id / "model.safetensors")
        load_tuned(model, theta0)
        cache.put("local FT", local)
        cache.put("local FT training", costs)
    done("local")

    # SIFT: one artifact grown author by author (train_tasks resumes), served at every T. A copy is kept when T - k
    # authors are merged: the artifact never trained on the k authors the unlearning study forgets.
    artifact = work_dir / "sift-merged"
    sift_local, sift_costs = cache.get("SIFT local") or {}, cache.get("SIFT training") or {}
    retain_count = largest - profile.forget
    for count in tqdm(sorted(set(counts) | {retain_count}), desc="SIFT at T", unit="T"):
        snapshot_dir = work_dir / f"sift-merged@{count}"
        scored = count not in counts or (f"SIFT-Masks@{count}" in cache.data and f"SIFT+Merge@{count}" in cache.data)
        # The merge of T - k and of all T must exist for the unlearning study (train_tasks skips what it holds).
        if scored and count != largest and (count != retain_count or snapshot_dir.is_dir()):
            continue
        callback = ScoreWhenTrained(scorer)
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its end-of-training metrics
            train_tasks(
                model,
                dataset,
                task_column="author",
                args=sift_config(profile, work_dir / "runs"),
                output_dir=artifact,
                tasks=ids[:count],
                data_collator=collator,
                callbacks=[callback],
                base_model=str(base_dir),
            )
        model.eval()
        sift_local.update(callback.scores)
        sift_costs.update(callback.training)
        cache.put("SIFT local", sift_local)
        cache.put("SIFT training", sift_costs)
        if profile.forget and count == retain_count and not snapshot_dir.is_dir():
            shutil.copytree(artifact, snapshot_dir)
        if scored:
            continue
        served = MergedMaskedModel.from_pretrained(artifact, task=None, base_model=base_dir).to(model.device)
        full = count == largest
        plain = {t: scorer(served, t, full) for t in ids[:count]}
        masked = {}
        for task_id in ids[:count]:
            served.set_task(task_id)
            masked[task_id] = scorer(served, task_id, full)
        cache.put(f"SIFT+Merge@{count}", plain)
        cache.put(f"SIFT-Masks@{count}", masked)
        del served
    done("sift")

    # The baselines, merged from the local FT checkpoints with hf_sift.merging.
    for label, method in MERGES.items():
        if profile.merges is not None and label not in profile.merges:
            continue
        for count in tqdm(counts, desc=label, unit="T"):
            if cache.get(f"{label}@{count}") is not None:
                continue
            params = {"scaling": 1.0 / count} if method == "task_arithmetic" else {}
            out = work_dir / f"merge-{method}-{count}"
            started = time.perf_counter()
            result = merge_checkpoints(
                method,
                base_dir,
                [ft_dir / t for t in ids[:count]],
                out,
                params=params,
                task_ids=ids[:count],
                parameters=ParameterSelection(),
            )
            merge_seconds = time.perf_counter() - started
            full = count == largest
            scores = {}
            if result.config.get("masks"):
                for task_id in ids[:count]:
                    state = task_state_dict(out, base_dir, task_id)
                    load_tuned(model, {n: state[n] for n in names})
                    scores[task_id] = scorer(model, task_id, full)
            else:
                state = task_state_dict_plain(out, names)
                load_tuned(model, state)
                scores = {t: scorer(model, t, full) for t in ids[:count]}
            load_tuned(model, theta0)
            shutil.rmtree(out)
            cache.put(f"{label}@{count}", scores)
            cache.put(f"{label}@{count} merge seconds", merge_seconds)
    done("baselines")

    # Central FT: one model on every author, T x steps steps (the same number of examples as the T local runs).
    if profile.central and cache.get(f"Central FT@{largest}") is None:
        cost = train_plain(model, dataset, collator, profile, work_dir / "runs", None, profile.steps * largest)
        scores = {t: scorer(model, t) for t in tqdm(ids, desc="central FT", unit="author")}
        load_tuned(model, theta0)
        cache.put(f"Central FT@{largest}", scores)
        cache.put("Central FT training", cost)
    done("central")
    return cache.data


def task_state_dict_plain(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The tuned tensors of a merged checkpoint (no masks)."""
    from hf_sift.merging import CheckpointReader

    reader = CheckpointReader(folder)
    return {n: reader.get(n) for n in names}

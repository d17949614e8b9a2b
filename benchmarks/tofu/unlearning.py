"""The unlearning study: forget k authors, one request at a time, from the merge of T (the paper's Figure 9).

- SIFT-Masks: each request is one `hf_sift.unlearn` call, which replays that author's training, checks it against
  the recorded digest and subtracts it. Its steps and wall time are measured. Afterwards the artifact is compared
  with the one `train_tasks` had written when only the first T - k authors were merged (before the forgotten ones
  were ever trained): equal digests and equal files mean the forget quality is the retain-only model's by
  construction.
- The other methods' costs follow from what each must retrain to remove one author (the registry's
  `removal_cost`): FT+Merge replays the author (its own training time); TIES, TALL-masks and EMR-merging need every
  remaining author's model; Central FT retrains on the remaining authors.
- NegMerge (approximate, for contrast): K candidates finetuned on the forget authors from the FT+Merge model of all
  T authors, sign consensus, λ searched on the answer probabilities; its forget quality and model utility are
  measured against FT+Merge of the remaining authors (the retain-only model).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from hf_sift import MergedDelta, MergedMaskedModel, ParameterSelection
from hf_sift.merging import CheckpointReader, merge_checkpoints

from . import metrics
from .data import Author, GeneralSet, PadCollator, training_dataset
from .models import load_model
from .profiles import Profile
from .training import load_tuned, recipe, sift_config, snapshot, tuned_names


LOG_NAME = "sift_unlearning_log.jsonl"


def artifact_files(folder: Path) -> dict[str, bytes]:
    """Every file of a SIFT artifact but its unlearning log (the record of the removals themselves)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != LOG_NAME)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def forget_ratios(model: Any, tokenizer: Any, authors: list[Author], questions: int | None) -> list[float]:
    """Raw truth ratios R on the forgotten authors' questions (paraphrased vs perturbed answers)."""
    ratios: list[float] = []
    for author in authors:
        n = questions or len(author.questions)
        reference = metrics.answer_losses(model, tokenizer, author.questions[:n], author.paraphrased[:n])
        wrong = metrics.perturbed_losses(model, tokenizer, author.questions[:n], author.perturbed[:n])
        ratios += metrics.truth_ratios(reference, wrong)
    return ratios


def general_scores(model: Any, tokenizer: Any, general: GeneralSet, max_new_tokens: int) -> dict[str, float]:
    """Probability (normalised over the perturbed answers), ROUGE-L recall and truth ratio on a utility set."""
    true = metrics.answer_losses(model, tokenizer, general.questions, general.answers)
    wrong = metrics.perturbed_losses(model, tokenizer, general.questions, general.perturbed)
    generations = metrics.greedy_answers(model, tokenizer, general.questions, max_new_tokens)
    recalls = metrics.rouge_l_recalls(general.answers, generations)
    return {
        "probability": metrics.normalised_probability(true, wrong),
        "rouge_l_recall": sum(recalls) / len(recalls),
        "truth_ratio": metrics.truth_ratio_score(metrics.truth_ratios(true, wrong)),
    }


def utility(retain: dict[str, dict[str, Any]], general: dict[str, dict[str, float]]) -> dict[str, Any]:
    """TOFU's model utility: harmonic mean of the 9 values (retain, real authors, world facts)."""
    retain_values = {
        "probability": sum(s["answer_probability"] for s in retain.values()) / len(retain),
        "rouge_l_recall": sum(s["rouge_l_recall"] for s in retain.values()) / len(retain),
        "truth_ratio": sum(s["truth_ratio"] for s in retain.values()) / len(retain),
    }
    values = list(retain_values.values()) + [v for g in general.values() for v in g.values()]
    return {"model_utility": metrics.model_utility(values), "retain": retain_values, **general}


def run_unlearning_study(
    profile: Profile,
    base_dir: Path,
    tokenizer: Any,
    authors: list[Author],
    general: list[GeneralSet],
    work_dir: Path,
    scorer: Any,
    scores: dict[str, Any],
) -> dict[str, Any]:
    """Forget the last `profile.forget` authors one request at a time; returns the unlearning records."""
    from hf_sift import unlearn

    model = load_model(base_dir)
    dataset = training_dataset(tokenizer, authors)  # the very rows train_tasks saw (unlearn checks their digest)

    ids = [a.task_id for a in authors]
    count, k = len(ids), profile.forget
    forgotten, remaining = ids[::-1][:k], ids[: count - k]
    forget_authors = [a for a in authors if a.task_id in forgotten]
    collator = PadCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    names = tuned_names(model)
    theta0 = snapshot(model, names)

    # SIFT-Masks: one hf_sift.unlearn call per request, on a copy of the merge of T.
    target = work_dir / "sift-unlearned"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(work_dir / "sift-merged", target)
    requests = []
    for task_id in tqdm(forgotten, desc="unlearn (SIFT-Masks)", unit="request"):
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its end-of-training metrics
            report = unlearn(
                target,
                [task_id],
                model=model,
                dataset=dataset,
                task_column="author",
                args=sift_config(profile, work_dir / "runs"),
                data_collator=collator,
            )
        requests.append({"task_id": task_id, "steps": report.replay_steps, "seconds": report.wall_time_s})
    model.eval()
    retain_only = work_dir / f"sift-merged@{count - k}"
    unlearned_digest = MergedDelta.from_pretrained(target).digest
    retain_digest = MergedDelta.from_pretrained(retain_only).digest
    identical = artifact_files(target) == artifact_files(retain_only)

    # What every method must retrain per request (removal_cost), with the measured training times.
    local_seconds = scores["local FT training"]
    # Central FT's seconds per step; before it has trained (the study runs first), local FT's (same batch and model).
    central = scores.get("Central FT training") or {
        "seconds": sum(c["seconds"] for c in local_seconds.values()),
        "steps": sum(c["steps"] for c in local_seconds.values()),
    }
    per_step = central["seconds"] / max(1, central["steps"])
    costs: dict[str, list[dict[str, Any]]] = {
        m: [] for m in ("SIFT-Masks", "FT+Merge", "TIES", "TALL-masks", "EMR-merging", "Central FT")
    }
    left = list(ids)
    for request in requests:
        left.remove(request["task_id"])
        costs["SIFT-Masks"].append({"steps": request["steps"], "seconds": request["seconds"], "measured": True})
        replay = local_seconds[request["task_id"]]
        costs["FT+Merge"].append({"steps": replay["steps"], "seconds": replay["seconds"], "measured": False})
        retrain = {
            "steps": sum(local_seconds[t]["steps"] for t in left),
            "seconds": sum(local_seconds[t]["seconds"] for t in left),
            "measured": False,
        }
        for method in ("TIES", "TALL-masks", "EMR-merging"):
            costs[method].append(dict(retrain))
        steps = profile.steps * len(left)
        costs["Central FT"].append({"steps": steps, "seconds": per_step * steps, "measured": False})
    for entries in costs.values():
        total_steps = total_seconds = 0.0
        for entry in entries:
            total_steps += entry["steps"]
            total_seconds += entry["seconds"]
            entry["cumulative_steps"], entry["cumulative_seconds"] = int(total_steps), total_seconds

    # Forget quality (on every question of the forgotten authors: forward passes only, and the KS test needs the
    # sample) and model utility.
    results: dict[str, Any] = {}

    def measure(label: str, serve: Any, reference_ratios: list[float] | None) -> list[float]:
        ratios = forget_ratios(serve(None), tokenizer, forget_authors, None)
        retain = {t: scorer(serve(t), t) for t in remaining}
        gen = {g.name: general_scores(serve(None), tokenizer, g, profile.max_new_tokens) for g in general}
        results[label] = {
            "forget_questions": len(ratios),
            "forget_truth_ratio": metrics.truth_ratio_score(ratios, forget=True),
            "forget_quality": None if reference_ratios is None else metrics.forget_quality(ratios, reference_ratios),
            **utility(retain, gen),
        }
        return ratios

    def sift_server(folder: Path):
        served = MergedMaskedModel.from_pretrained(folder, task=None, base_model=base_dir).to(model.device)

        def serve(task_id: str | None):
            served.set_task(task_id)
            return served

        return serve

    reference = measure("SIFT-Masks retain-only", sift_server(retain_only), None)
    results["SIFT-Masks retain-only"]["forget_quality"] = 1.0  # the reference itself
    measure("SIFT-Masks after unlearning", sift_server(target), reference)

    # FT+Merge of the remaining authors: NegMerge's retain-only reference; NegMerge from FT+Merge of all T.
    def plain_server(state: dict[str, Any]):
        def serve(task_id: str | None):
            return model

        load_tuned(model, state)
        return serve

    def plain_merge(ids_: list[str]) -> dict[str, Any]:
        out = work_dir / "merge-unlearning"
        merge_checkpoints(
            "task_arithmetic",
            base_dir,
            [work_dir / "local-ft" / t for t in ids_],
            out,
            params={"scaling": 1.0 / len(ids_)},
            task_ids=ids_,
            parameters=ParameterSelection(),
        )
        reader = CheckpointReader(out)
        state = {n: reader.get(n).clone() for n in names}
        shutil.rmtree(out)
        return state

    ft_reference = measure("FT+Merge retain-only", plain_server(plain_merge(remaining)), None)
    results["FT+Merge retain-only"]["forget_quality"] = 1.0
    merged_all = plain_merge(ids)
    measure("FT+Merge (not unlearned)", plain_server(merged_all), ft_reference)

    from hf_sift.merging.negmerge_driver import loss_evaluator, negmerge_unlearn

    load_tuned(model, merged_all)
    rows = dataset["author"]
    forget_set = dataset.select([i for i, t in enumerate(rows) if t in forgotten])
    retain_set = dataset.select([i for i, t in enumerate(rows) if t in remaining])
    shared = {k: v for k, v in recipe(profile, work_dir / "runs").items() if k not in ("output_dir", "learning_rate")}
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        negmerge = negmerge_unlearn(
            model,
            forget_set,
            loss_evaluator(forget_set, retain_set, collator),
            grid={"learning_rate": [profile.learning_rate / 2, profile.learning_rate]},
            training_args=shared,
            data_collator=collator,
            parameters=names,
        )
    negmerge_seconds = time.perf_counter() - started
    measure(
        "NegMerge",
        plain_server({n: p.detach().clone() for n, p in model.named_parameters() if n in set(names)}),
        ft_reference,
    )
    results["NegMerge"]["negmerge"] = {**negmerge.to_dict(), "seconds": negmerge_seconds}
    load_tuned(model, theta0)
    return {
        "forgotten": forgotten,
        "remaining": remaining,
        "requests": costs,
        "sift_masks_identical_to_retain_only": {
            "digest_after_unlearning": unlearned_digest,
            "digest_never_trained": retain_digest,
            "files_equal": identical,
        },
        "models": results,
    }

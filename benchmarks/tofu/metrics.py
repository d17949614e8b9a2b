"""TOFU's metrics, as its authors define them (docs/tofu.md names the source of each).

- Per-token answer loss L̄: cross-entropy summed over the answer tokens (EOS included), divided by their number
  (locuslab/tofu `evaluate_util.py`, `get_batch_loss`; open-unlearning `evals/metrics/utils.py`).
- Answer probability: mean over questions of exp(-L̄) (tofu `aggregate_eval_stat.py`, "Prob."); on real authors
  and world facts, P_true / (P_true + Σ P_perturbed) with each P = exp(-L̄).
- Truth ratio R = exp(mean L̄(perturbed) - L̄(paraphrased)); reported as mean(max(0, 1 - 1/R)) on held-in data,
  real authors and world facts, and mean(min(R, 1/R)) on a forget set.
- ROUGE-L recall of the greedy answer against the true answer (`rouge_score`, stemmer on).
- Forget quality: the p-value of `scipy.stats.ks_2samp` between the forget-set truth ratios R of the unlearned model
  and of a model never trained on the forget set.
- Model utility: harmonic mean of probability, ROUGE-L recall and truth ratio on retain, real authors, world facts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .data import encode_pair, prompt


@torch.no_grad()
def answer_losses(
    model: Any, tokenizer: Any, questions: Sequence[str], answers: Sequence[str], batch_size: int = 20
) -> list[float]:
    """L̄ of each (question, answer) pair: the mean cross-entropy over the answer tokens and EOS."""
    from .data import collate

    was_training = model.training
    model.eval()
    losses: list[float] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        for start in range(0, len(questions), batch_size):
            rows = [
                encode_pair(tokenizer, q, a) for q, a in zip(questions[start : start + batch_size], answers[start:])
            ]
            batch = {k: v.to(model.device) for k, v in collate(rows, pad).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            token_loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none"
            )
            counts = (labels != -100).sum(dim=1)
            losses.extend((token_loss.sum(dim=1) / counts).cpu().tolist())
    finally:
        model.train(was_training)
    return losses


def probability(losses: Sequence[float]) -> float:
    """Mean over questions of exp(-L̄): TOFU's "Prob." on a held-in or forget set."""
    return sum(math.exp(-x) for x in losses) / len(losses)


def normalised_probability(true_losses: Sequence[float], perturbed_losses: Sequence[Sequence[float]]) -> float:
    """Mean of P_true / (P_true + Σ P_perturbed): TOFU's "Prob." on real authors and world facts."""
    values = []
    for true, wrong in zip(true_losses, perturbed_losses):
        p_true = math.exp(-true)
        values.append(p_true / (p_true + sum(math.exp(-x) for x in wrong)))
    return sum(values) / len(values)


def truth_ratios(reference_losses: Sequence[float], perturbed_losses: Sequence[Sequence[float]]) -> list[float]:
    """R per question: exp(mean L̄ of the perturbed answers - L̄ of the reference (paraphrased or true) answer)."""
    return [math.exp(sum(wrong) / len(wrong) - ref) for ref, wrong in zip(reference_losses, perturbed_losses)]


def truth_ratio_score(ratios: Sequence[float], forget: bool = False) -> float:
    """TOFU's reported truth ratio: mean(min(R, 1/R)) on a forget set, else mean(max(0, 1 - 1/R))."""
    values = [min(r, 1 / r) for r in ratios] if forget else [max(0.0, 1 - 1 / r) for r in ratios]
    return sum(values) / len(values)


def perturbed_losses(model: Any, tokenizer: Any, questions: Sequence[str], perturbed: Sequence[Sequence[str]]):
    """L̄ of every perturbed answer, per question (one batch per position in the perturbed lists)."""
    width = len(perturbed[0])
    columns = [answer_losses(model, tokenizer, questions, [p[k] for p in perturbed]) for k in range(width)]
    return [[columns[k][i] for k in range(width)] for i in range(len(questions))]


@torch.no_grad()
def greedy_answers(
    model: Any, tokenizer: Any, questions: Sequence[str], max_new_tokens: int, batch_size: int = 20
) -> list[str]:
    """Greedy generations after ``"Question: {q}\\nAnswer:"``, cut at EOS (left-padded batches)."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
    try:
        for start in range(0, len(questions), batch_size):
            encoded = [
                tokenizer(prompt(q), add_special_tokens=False)["input_ids"] for q in questions[start:][:batch_size]
            ]
            width = max(len(e) for e in encoded)
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
            attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
            generated = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=attention.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            for row in generated[:, width:].cpu():
                tokens = row.tolist()
                if tokenizer.eos_token_id in tokens:
                    tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
                outputs.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return outputs


def rouge_l_recalls(references: Sequence[str], generations: Sequence[str]) -> list[float]:
    """ROUGE-L recall of each generation against its reference (`rouge_score`, Porter stemmer)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    return [scorer.score(ref, gen)["rougeL"].recall for ref, gen in zip(references, generations)]


def forget_quality(unlearned_ratios: Sequence[float], retain_only_ratios: Sequence[float]) -> float:
    """p-value of the two-sample KS test between the forget-set truth ratios of two models."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(list(unlearned_ratios), list(retain_only_ratios)).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean of the utility values (0 if any is 0)."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)

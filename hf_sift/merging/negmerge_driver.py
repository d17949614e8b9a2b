"""NegMerge end to end: finetune K candidates on a forget set, fold them into the consensus, search λ, save.

Each candidate starts from the original weights and is trained with the Hugging Face `Trainer` for one point of a
hyper-parameter grid (learning rate, epochs, weight decay, ...). As soon as it finishes it is folded into a
[`~hf_sift.merging.NegMergeAccumulator`] and discarded, so one model (plus the running sum and sign tally) is in
memory at a time. λ is then chosen as in the paper and the unlearned model is saved as a plain transformers
checkpoint.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import staged_folder
from ..trainer.log_routing import route_trainer_logs
from ..version import __version__
from .negmerge import NegMergeAccumulator, ScalingSearchResult, search_scaling
from .registry import InvalidMergeParameterError


NEGMERGE_CONFIG = "negmerge_config.json"
# TrainingArguments every candidate gets unless `training_args` says otherwise (candidates are never checkpointed).
DEFAULT_TRAINING_ARGUMENTS: dict[str, Any] = {"report_to": "none", "save_strategy": "no", "disable_tqdm": True}
DEFAULT_SCALINGS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


@dataclass
class NegMergeResult:
    """The outcome of [`negmerge_unlearn`].

    Args:
        model (`PreTrainedModel`): The unlearned model (θ0 - λ τ_neg applied in place).
        search (`ScalingSearchResult`): The λ search, with the original model's metrics.
        candidates (`list[dict]`): The hyper-parameters of each finetuned candidate, in training order.
        consensus_fraction (`float`): Fraction of elements where every candidate's sign agreed.
        output_dir (`Path`, *optional*): Where the model was saved.
        task_vector (`dict[str, torch.Tensor]`): τ_neg, to apply another λ with `negated_state_dict`.
    """

    model: Any
    search: ScalingSearchResult
    candidates: list[dict[str, Any]] = field(default_factory=list)
    consensus_fraction: float = 0.0
    output_dir: Path | None = None
    task_vector: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def scaling(self) -> float:
        return self.search.scaling

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "negmerge",
            "hf_sift_version": __version__,
            "scaling": self.scaling,
            "consensus_fraction": self.consensus_fraction,
            "candidates": self.candidates,
            "search": self.search.to_dict(),
        }


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of a hyper-parameter grid, in a stable order (keys sorted)."""
    if not grid:
        raise InvalidMergeParameterError("the hyper-parameter grid is empty: NegMerge needs at least one candidate")
    keys = sorted(grid)
    for key in keys:
        if isinstance(grid[key], (str, bytes)) or not len(grid[key]):
            raise InvalidMergeParameterError(f"grid entry {key!r} must be a non-empty list of values")
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


@torch.no_grad()
def mean_loss(model: torch.nn.Module, dataset, collator: Callable, batch_size: int = 8) -> float:
    """Token-weighted mean causal-LM loss of `model` over a tokenized dataset."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collator(rows)
        labels = batch["labels"]
        out = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")})
        count = int((labels[:, 1:] != -100).sum())
        total += float(out.loss) * count
        tokens += count
    return total / tokens if tokens else float("nan")


def loss_evaluator(forget_dataset, retain_dataset, collator: Callable, batch_size: int = 8) -> Callable:
    """An `evaluate` callable for [`search_scaling`] from causal-LM losses.

    Both metrics are ``exp(-mean loss)`` (the geometric-mean probability of the reference tokens): the forget
    metric is minimised, the retain metric must stay above the fraction of the original's.
    """

    def evaluate(model: torch.nn.Module) -> tuple[float, float]:
        forget = math.exp(-mean_loss(model, forget_dataset, collator, batch_size))
        retain = math.exp(-mean_loss(model, retain_dataset, collator, batch_size))
        return forget, retain

    return evaluate


def negmerge_unlearn(
    model,
    forget_dataset,
    evaluate: Callable[[torch.nn.Module], tuple[float, float]],
    output_dir: str | os.PathLike | None = None,
    *,
    grid: Mapping[str, Sequence[Any]],
    scalings: Sequence[float] = DEFAULT_SCALINGS,
    retain_fraction: float = 0.95,
    training_args: Mapping[str, Any] | None = None,
    data_collator: Callable | None = None,
    processing_class=None,
    parameters: Iterable[str] | None = None,
) -> NegMergeResult:
    """Unlearn `forget_dataset` from `model` with NegMerge.

    Args:
        model (`PreTrainedModel` or `str`): The original model (or its checkpoint folder); modified in place.
        forget_dataset (`datasets.Dataset`): The tokenized forget set the candidates are finetuned on.
        evaluate (`Callable[[torch.nn.Module], tuple[float, float]]`):
            Returns ``(forget_metric, retain_metric)`` of a model; see [`loss_evaluator`].
        output_dir (`str` or `os.PathLike`, *optional*): Where to save the unlearned checkpoint (atomically).
        grid (`Mapping[str, Sequence]`):
            `TrainingArguments` fields and their values; one candidate per point of the cartesian product, e.g.
            ``{"learning_rate": [1e-5, 5e-5], "num_train_epochs": [1, 2]}``.
        scalings (`Sequence[float]`, *optional*): The λ grid.
        retain_fraction (`float`, *optional*, defaults to 0.95): λ must keep retain >= this x the original's.
        training_args (`Mapping[str, Any]`, *optional*): `TrainingArguments` fields shared by every candidate.
        data_collator (`Callable`, *optional*): The `Trainer`'s collator.
        processing_class (*optional*): A tokenizer, passed to the `Trainer` and saved with the model.
        parameters (`Iterable[str]`, *optional*): Names NegMerge acts on; every floating-point tensor by default.
    """
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    if isinstance(model, (str, os.PathLike)):
        from ..remote_code import refuse_remote_code

        refuse_remote_code(model)
        model = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=False)
    points = expand_grid(grid)
    original = {n: t.detach().clone() for n, t in model.state_dict().items()}
    accumulator = NegMergeAccumulator(original, parameters)
    shared = {**DEFAULT_TRAINING_ARGUMENTS, **dict(training_args or {})}
    if "output_dir" in shared or any("output_dir" in point for point in points):
        raise InvalidMergeParameterError("negmerge_unlearn trains its candidates in a temporary folder: no output_dir")
    candidates = []
    with tempfile.TemporaryDirectory(prefix="hf_sift-negmerge-") as scratch:
        for i, point in enumerate(points):
            model.load_state_dict(original)
            args = TrainingArguments(output_dir=os.path.join(scratch, f"candidate-{i}"), **{**shared, **point})
            trainer = Trainer(
                model=model,
                args=args,
                train_dataset=forget_dataset,
                data_collator=data_collator,
                processing_class=processing_class,
            )
            route_trainer_logs(trainer)
            output = trainer.train()
            del trainer
            accumulator.add(model.state_dict())
            candidates.append({**point, "train_loss": float(output.training_loss)})
    model.eval()
    task_vector = accumulator.task_vector()
    search = search_scaling(model, original, task_vector, scalings, evaluate, retain_fraction)
    result = NegMergeResult(model, search, candidates, accumulator.consensus_fraction(), task_vector=task_vector)
    if output_dir is not None:
        save_unlearned(result, output_dir, processing_class)
    return result


def save_unlearned(result: NegMergeResult, output_dir: str | os.PathLike, processing_class=None) -> None:
    """Save the unlearned model as a plain transformers checkpoint, with `negmerge_config.json` and a model card."""
    from huggingface_hub import ModelCard, ModelCardData

    with staged_folder(output_dir) as stage:
        result.model.save_pretrained(stage)
        if processing_class is not None:
            processing_class.save_pretrained(stage)
        (stage / NEGMERGE_CONFIG).write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n")
        base = getattr(result.model.config, "_name_or_path", None) or None
        data = ModelCardData(library_name="transformers", tags=["unlearning", "negmerge", "hf_sift"])
        rows = "\n".join(
            f"| {t.scaling} | {t.forget:.6g} | {t.retain:.6g} | {'yes' if t.feasible else 'no'} |"
            for t in result.search.trials
        )
        content = (
            f"---\n{data.to_yaml()}\n---\n\n# Unlearned model (NegMerge)\n\n"
            f"Unlearned with hf_sift {__version__} by NegMerge from `{base}`: {len(result.candidates)} candidates "
            f"finetuned on the forget set, sign consensus on {result.consensus_fraction:.2%} of the elements, "
            f"λ = {result.scaling}.\n\n"
            f"Original model: forget {result.search.original_forget:.6g}, retain {result.search.original_retain:.6g}."
            f"\n\n| λ | forget | retain | retain kept |\n|---|---|---|---|\n{rows}\n"
        )
        ModelCard(content).save(stage / "README.md")
    result.output_dir = Path(output_dir)

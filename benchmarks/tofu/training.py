"""Training for the benchmark, all through the library or plain transformers (no second SIFT implementation).

- SIFT (local, +Merge, -Masks): `hf_sift.train_tasks` with a `SIFTConfig`; a callback scores each author's own SIFT
  model when its training ends, before `train_tasks` resets the weights to θ0.
- Local FT and Central FT: the plain `transformers.Trainer` with the same recipe (arguments, per-author seed, data
  order) and the same tuned parameters (hf_sift's default selection: everything but embeddings and LM head), without
  the sign constraint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from hf_sift import ParameterSelection, SIFTConfig
from hf_sift.trainer.sift_config import derive_seed
from hf_sift.trainer.sift_trainer import freeze_all_but, select_tuned_names

from .profiles import Profile


def recipe(profile: Profile, output_dir: Path, max_steps: int | None = None) -> dict[str, Any]:
    """The `TrainingArguments` fields every run shares (the paper's recipe, scaled by the profile)."""
    return {
        "output_dir": str(output_dir),
        "max_steps": max_steps or profile.steps,
        "per_device_train_batch_size": profile.batch_size,
        "learning_rate": profile.learning_rate,
        "seed": profile.seed,
        "save_strategy": "no",
        "logging_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": not torch.cuda.is_available(),
    }


def sift_config(profile: Profile, output_dir: Path) -> SIFTConfig:
    return SIFTConfig(sign_seed=profile.sign_seed, **recipe(profile, output_dir))


def tuned_names(model: torch.nn.Module) -> list[str]:
    """hf_sift's default selection: every trainable floating-point parameter but input embeddings and LM head."""
    return select_tuned_names(model, ParameterSelection())


def snapshot(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


@torch.no_grad()
def load_tuned(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into the model's parameters of the same names, in place."""
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        params[name].copy_(tensor)


def train_plain(
    model: torch.nn.Module,
    dataset: Any,
    collator: Callable,
    profile: Profile,
    run_dir: Path,
    task_id: str | None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Unconstrained finetuning with `transformers.Trainer`; the model keeps the tuned weights.

    The seed of an author's run is derived from `(seed, task_id)` exactly as `SIFTConfig` does it, so local FT and
    SIFT see the same batches in the same order.
    """
    freeze_all_but(model, tuned_names(model))
    fields = recipe(profile, run_dir, max_steps)
    if task_id is not None:
        fields["seed"] = derive_seed(profile.seed, task_id)
    timer = ScoreWhenTrained(name=task_id or "all authors")
    trainer = Trainer(
        model=model, args=TrainingArguments(**fields), train_dataset=dataset, data_collator=collator, callbacks=[timer]
    )
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-training metrics dict
    output = trainer.train()
    model.eval()
    return {**timer.training[None], "train_loss": float(output.training_loss)}


class ScoreWhenTrained(TrainerCallback):
    """Time each run from its first to its last step, show its steps in a progress bar, and score the trained model
    when its training ends (inside `train_tasks`: before the reset to θ0).

    Args:
        score (`Callable[[model, str], dict]`, *optional*): Scores the trained model on the author `task_id`.
        name (`str`, *optional*): The progress bar's label where the run's arguments carry no `task_id` (plain
            `Trainer` runs).
    """

    def __init__(self, score: Callable[[Any, str], dict[str, Any]] | None = None, name: str | None = None):
        self.score = score
        self.name = name
        self.scores: dict[str, dict[str, Any]] = {}
        self.training: dict[str, dict[str, Any]] = {}
        self._started = 0.0
        self._bar: tqdm | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        name = getattr(args, "task_id", None) or self.name or "a run"
        self._bar = tqdm(total=state.max_steps, desc=f"training {name}", unit="step", leave=False)
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._bar is not None:
            self._bar.update(1)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        seconds = time.perf_counter() - self._started
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        task_id = getattr(args, "task_id", None)
        self.training[task_id] = {"steps": state.global_step, "seconds": seconds}
        if self.score is not None:
            self.scores[task_id] = self.score(model, task_id)

"""The TrainerCallback that applies the SIFT projection after every optimizer step."""

from __future__ import annotations

import os
from collections.abc import Callable

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .sign_constraint import SignConstraint


class SIFTProjectionCallback(TrainerCallback):
    """Project the tuned parameters onto the sign constraint after each optimizer step, and checkpoint θ0.

    `on_optimizer_step` runs right after `optimizer.step()` and before `zero_grad()` and the next forward; with
    gradient accumulation the Trainer calls it on real optimizer steps only.

    Args:
        constraint (`Callable[[], SignConstraint | None]`):
            Returns the trainer's current constraint (None before training starts).
        start (`Callable[[], None]`): Sets θ0 when training starts (after a resumed checkpoint is loaded).
    """

    def __init__(self, constraint: Callable[[], SignConstraint | None], start: Callable[[], None]):
        self._constraint = constraint
        self._start = start

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self._start()

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        constraint = self._constraint()
        if constraint is not None:
            constraint.project_()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        constraint = self._constraint()
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if constraint is not None and args.should_save and os.path.isdir(folder):
            constraint.save(folder)

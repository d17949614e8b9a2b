"""The Trainer's logs as `logging` records, not printed dicts.

transformers prints each log of a `Trainer` (the loss, the learning rate, and at the end of `train()` the
`{'train_runtime': ...}` summary, which is logged even with `logging_strategy="no"`): `PrinterCallback.on_log`
`print`s it when `disable_tqdm` is set, and `ProgressCallback.on_log` writes it under the progress bar otherwise.
Training hundreds of tasks prints hundreds of unlabelled dicts. [`route_trainer_logs`] keeps the progress bars
and sends each log to the `hf_sift.trainer` logger instead, where the caller's logging configuration decides.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import PrinterCallback, ProgressCallback, TrainerCallback


logger = logging.getLogger("hf_sift.trainer")


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class LoggingCallback(TrainerCallback):
    """Sends each log of the Trainer to the `hf_sift.trainer` logger (INFO), on the main process."""

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        fields = ", ".join(f"{k}={_format(v)}" for k, v in logs.items() if k != "total_flos")
        task = getattr(args, "task_id", None)
        where = f"task {task}, step {state.global_step}" if task is not None else f"step {state.global_step}"
        logger.info("%s: %s", where, fields)


class ProgressBarCallback(ProgressCallback):
    """transformers' progress bars, without the log dicts written under them (see [`LoggingCallback`])."""

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        return None


def route_trainer_logs(trainer: Any) -> None:
    """Replace the printing callbacks of `trainer` (a `transformers.Trainer`): logs go to `logging`, bars stay."""
    if trainer.pop_callback(PrinterCallback) is None and trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressBarCallback)
    if not any(isinstance(cb, LoggingCallback) for cb in trainer.callback_handler.callbacks):
        trainer.add_callback(LoggingCallback)

"""Sign-fixed finetuning on the Hugging Face Trainer, for one task or hundreds.

The names are imported on first use, so that `hf-sift train --help` (which only needs [`SIFTConfig`]) does not
import the Trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports


_LAZY = {
    "Recipe": ".recipe",
    "SIFTConfig": ".sift_config",
    "SIFTTrainer": ".sift_trainer",
    "SignConstraint": ".sign_constraint",
    "train_task": ".multi_task",
    "train_tasks": ".multi_task",
}

if TYPE_CHECKING:
    from .multi_task import train_task, train_tasks
    from .recipe import Recipe
    from .sift_config import SIFTConfig
    from .sift_trainer import SIFTTrainer
    from .sign_constraint import SignConstraint


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = ["Recipe", "SIFTConfig", "SIFTTrainer", "SignConstraint", "train_task", "train_tasks"]

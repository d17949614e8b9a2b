"""Sign-fixed finetuning on the Hugging Face Trainer, for one task or hundreds.

The names are imported on first use, so that `hf-sift train --help` (which only needs [`SIFTConfig`]) does not
import the Trainer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["Recipe", "SIFTConfig", "SIFTTrainer", "SignConstraint", "train_task", "train_tasks"]

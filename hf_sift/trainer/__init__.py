"""Sign-fixed finetuning on the Hugging Face Trainer, for one task or hundreds.

The names are imported on first use, so that `hf-sift train --help` (which only needs [`SIFTConfig`]) does not
import the Trainer.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any


_LAZY = {
    "SIFTConfig": ".sift_config",
    "SIFTTrainer": ".sift_trainer",
    "SignConstraint": ".sign_constraint",
    "train_tasks": ".train_tasks",
}

if TYPE_CHECKING:
    from .sift_config import SIFTConfig
    from .sift_trainer import SIFTTrainer
    from .sign_constraint import SignConstraint
    from .train_tasks import train_tasks


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _TrainerPackage(types.ModuleType):
    """Keeps `hf_sift.trainer.train_tasks` the function when the import system binds the submodule of that name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _TrainerPackage


__all__ = ["SIFTConfig", "SIFTTrainer", "SignConstraint", "train_tasks"]

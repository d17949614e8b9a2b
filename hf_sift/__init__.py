"""hf_sift: exact unlearning of finetuning data through model merging (SIFT-Masks, NegMerge and baselines).

Every public name is imported on first use (PEP 562), so that `import hf_sift` and `hf-sift --help` stay fast:
the core (sign vectors, task vectors, the exact merged delta) needs torch, and the trainer, the masked model and
the merging methods need transformers and peft.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import SiftError
from .version import __version__


_LAZY = {
    "ArtifactConfig": ".artifact_config",
    "MergedDelta": ".merged_delta",
    "MergedMaskedModel": ".masked_model",
    "ParameterSelection": ".selection",
    "SIFTConfig": ".trainer",
    "SIFTTrainer": ".trainer",
    "SignVector": ".sign_vector",
    "TaskVector": ".task_vector",
    "merge_checkpoints": ".merging",
    "negmerge_unlearn": ".merging.negmerge_driver",
    "train_tasks": ".trainer.train_tasks",
}

if TYPE_CHECKING:
    from .artifact_config import ArtifactConfig
    from .masked_model import MergedMaskedModel
    from .merged_delta import MergedDelta
    from .merging import merge_checkpoints
    from .merging.negmerge_driver import negmerge_unlearn
    from .selection import ParameterSelection
    from .sign_vector import SignVector
    from .task_vector import TaskVector
    from .trainer import SIFTConfig, SIFTTrainer, train_tasks


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_sift' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ArtifactConfig",
    "MergedDelta",
    "MergedMaskedModel",
    "ParameterSelection",
    "SIFTConfig",
    "SIFTTrainer",
    "SiftError",
    "SignVector",
    "TaskVector",
    "__version__",
    "merge_checkpoints",
    "negmerge_unlearn",
    "train_tasks",
]

"""hf_sift: exact unlearning of finetuning data through model merging (SIFT-Masks, NegMerge and baselines).

The core (sign vectors, task vectors, the exact merged delta) is imported eagerly; the parts built on
transformers and peft (trainer, masked model, merging methods) are imported on first use, so that
`import hf_sift` and `hf-sift --help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


__version__ = "0.1.0"

from .errors import SiftError  # noqa: E402
from .merged_delta import MergedDelta  # noqa: E402
from .selection import ParameterSelection  # noqa: E402
from .sign_vector import SignVector  # noqa: E402
from .task_vector import TaskVector  # noqa: E402
from .task_vector_store import TaskVectorStore  # noqa: E402
from .unlearn import UnlearningReport, unlearn  # noqa: E402
from .unlearning_log import UnlearningLog  # noqa: E402
from .verify import verify_artifact  # noqa: E402


_LAZY = {
    "MergedMaskedModel": ".masked_model",
    "SIFTConfig": ".trainer",
    "SIFTTrainer": ".trainer",
    "merge_checkpoints": ".merging",
    "negmerge_unlearn": ".merging.negmerge_driver",
    "train_tasks": ".trainer",
}

if TYPE_CHECKING:
    from .masked_model import MergedMaskedModel
    from .merging import merge_checkpoints
    from .merging.negmerge_driver import negmerge_unlearn
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
    "MergedDelta",
    "MergedMaskedModel",
    "ParameterSelection",
    "SIFTConfig",
    "SIFTTrainer",
    "SiftError",
    "SignVector",
    "TaskVector",
    "TaskVectorStore",
    "UnlearningLog",
    "UnlearningReport",
    "__version__",
    "merge_checkpoints",
    "negmerge_unlearn",
    "train_tasks",
    "unlearn",
    "verify_artifact",
]

"""hf_sift: exact unlearning of finetuning data through model merging (SIFT-Masks, NegMerge and baselines).

Every public name is imported on first use (PEP 562), so that `import hf_sift` and `hf-sift --help` stay fast:
the core (sign vectors, task vectors, the exact merged delta) needs torch, and the trainer, the masked model and
the merging methods need transformers and peft.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import SiftError
from .lazy_exports import lazy_exports
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
    "TaskVectorStore": ".task_vector_store",
    "UnlearningLog": ".unlearning_log",
    "UnlearningReport": ".unlearning",
    "merge_checkpoints": ".merging",
    "negmerge_unlearn": ".merging.negmerge_driver",
    "train_tasks": ".trainer.multi_task",
    "unlearn": ".unlearning",
    "verify_artifact": ".verify",
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
    from .task_vector_store import TaskVectorStore
    from .trainer import SIFTConfig, SIFTTrainer, train_tasks
    from .unlearning import UnlearningReport, unlearn
    from .unlearning_log import UnlearningLog
    from .verify import verify_artifact


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


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

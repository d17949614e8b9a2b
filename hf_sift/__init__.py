"""hf_sift: exact unlearning of finetuning data through model merging (SIFT-Masks, NegMerge and baselines)."""

__version__ = "0.1.0"

from .errors import SiftError  # noqa: E402
from .merged_delta import MergedDelta  # noqa: E402
from .selection import ParameterSelection  # noqa: E402
from .sign_vector import SignVector  # noqa: E402
from .task_vector import TaskVector  # noqa: E402
from .trainer import SIFTConfig, SIFTTrainer, train_tasks  # noqa: E402


__all__ = [
    "MergedDelta",
    "ParameterSelection",
    "SIFTConfig",
    "SIFTTrainer",
    "SiftError",
    "SignVector",
    "TaskVector",
    "__version__",
    "train_tasks",
]

"""hf_sift: exact unlearning of finetuning data through model merging (SIFT-Masks, NegMerge and baselines)."""

__version__ = "0.1.0"

from .errors import SiftError  # noqa: E402
from .masked_model import MergedMaskedModel  # noqa: E402
from .merged_delta import MergedDelta  # noqa: E402
from .merging import merge_checkpoints  # noqa: E402
from .merging.negmerge_driver import negmerge_unlearn  # noqa: E402
from .selection import ParameterSelection  # noqa: E402
from .sign_vector import SignVector  # noqa: E402
from .task_vector import TaskVector  # noqa: E402


__all__ = [
    "MergedDelta",
    "MergedMaskedModel",
    "ParameterSelection",
    "SiftError",
    "SignVector",
    "TaskVector",
    "__version__",
    "merge_checkpoints",
    "negmerge_unlearn",
]

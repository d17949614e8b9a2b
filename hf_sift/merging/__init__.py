"""Merging methods behind one interface: SIFT-Masks, NegMerge and the baselines, streamed tensor by tensor.

Every method is registered by name (see [`available_methods`]) and declares whether it supports exact removal
of a task and what removal costs.
"""

from . import dare, emr, magmax, negmerge, sift, soup, tall_masks, task_arithmetic, ties  # noqa: F401 (register)
from .checkpoint_merge import MergeResult, load_task_masks, merge_checkpoints, task_state_dict
from .negmerge import (
    NegMergeAccumulator,
    ScalingSearchResult,
    apply_negation,
    negated_state_dict,
    negmerge_task_vector,
    search_scaling,
)
from .registry import (
    REMOVAL_COST_ALL,
    REMOVAL_COST_ONE,
    InvalidMergeParameterError,
    MergeMethod,
    MergeParams,
    TensorMerge,
    UnknownMergeMethodError,
    available_methods,
    create_method,
    get_method,
    parse_params,
    register_method,
)
from .streaming import CheckpointError, CheckpointReader, StreamingCheckpointWriter


__all__ = [
    "REMOVAL_COST_ALL",
    "REMOVAL_COST_ONE",
    "CheckpointError",
    "CheckpointReader",
    "InvalidMergeParameterError",
    "MergeMethod",
    "MergeParams",
    "MergeResult",
    "NegMergeAccumulator",
    "ScalingSearchResult",
    "StreamingCheckpointWriter",
    "TensorMerge",
    "UnknownMergeMethodError",
    "apply_negation",
    "available_methods",
    "create_method",
    "get_method",
    "load_task_masks",
    "merge_checkpoints",
    "negated_state_dict",
    "negmerge_task_vector",
    "parse_params",
    "register_method",
    "search_scaling",
    "task_state_dict",
]

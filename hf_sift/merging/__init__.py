"""Merging methods behind one interface: SIFT-Masks, NegMerge and the baselines, streamed tensor by tensor.

Every method is registered by name (see [`available_methods`]) and declares whether it supports exact removal
of a task and what removal costs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports


# The built-in methods: name -> module that registers it. The registry imports these on first use; the command line
# lists the names without importing torch.
BUILTIN_METHODS: dict[str, str] = {
    "dare": "dare",
    "emr": "emr",
    "magmax": "magmax",
    "negmerge": "negmerge",
    "sift": "sift",
    "soup": "soup",
    "tall_masks": "tall_masks",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
}

_LAZY = {
    "MergeResult": ".checkpoint_merge",
    "load_task_masks": ".checkpoint_merge",
    "merge_checkpoints": ".checkpoint_merge",
    "task_state_dict": ".checkpoint_merge",
    "NegMergeAccumulator": ".negmerge",
    "ScalingSearchResult": ".negmerge",
    "apply_negation": ".negmerge",
    "negated_state_dict": ".negmerge",
    "negmerge_task_vector": ".negmerge",
    "search_scaling": ".negmerge",
    "REMOVAL_COST_ALL": ".registry",
    "REMOVAL_COST_ONE": ".registry",
    "MergeMethod": ".registry",
    "MergeParams": ".registry",
    "TensorMerge": ".registry",
    "available_methods": ".registry",
    "create_method": ".registry",
    "get_method": ".registry",
    "parse_params": ".registry",
    "register_method": ".registry",
    "CheckpointReader": ".streaming",
    "StreamingCheckpointWriter": ".streaming",
    "CheckpointError": "..errors",
    "InvalidMergeParameterError": "..errors",
    "UnknownMergeMethodError": "..errors",
}

if TYPE_CHECKING:
    from ..errors import CheckpointError, InvalidMergeParameterError, UnknownMergeMethodError
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
        MergeMethod,
        MergeParams,
        TensorMerge,
        available_methods,
        create_method,
        get_method,
        parse_params,
        register_method,
    )
    from .streaming import CheckpointReader, StreamingCheckpointWriter


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


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

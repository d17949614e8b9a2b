"""The merge methods by name, and what every method declares.

A method is a small class: typed parameters (a frozen dataclass), a per-tensor merge rule, and two declarations
used by the benchmarks and the docs: whether it supports exact removal of one task, and what removal costs
(how many tasks must be retrained to take one out).

Example:

```python
from hf_sift.merging import create_method

ties = create_method("ties", density=0.2)
merged = ties.merge_tensor("w", base, [tuned_1, tuned_2])
```
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union

import torch

from ..errors import InvalidArgumentError, InvalidMergeParameterError, UnknownMergeMethodError


REMOVAL_COST_ONE = "1"
REMOVAL_COST_ALL = "all remaining"


@dataclass(frozen=True)
class MergeParams:
    """Base of every method's parameters (an empty set)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass
class TensorMerge:
    """The result of merging one tensor.

    Args:
        tensor (`torch.Tensor`): The merged tensor, in the base tensor's dtype.
        masks (`list[torch.Tensor]`, *optional*): Per-task boolean masks (localisation methods), one per model.
    """

    tensor: torch.Tensor
    masks: list[torch.Tensor] | None = None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merges are computed in: float32, or float64 for float64 weights."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def task_vectors(base: torch.Tensor, tuned: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``θ_t - θ0`` for each model, in the compute dtype."""
    dtype = compute_dtype(base.dtype)
    base = base.to(dtype)
    return [t.to(dtype) - base for t in tuned]


class MergeMethod:
    """Base class of the merge methods.

    Subclasses set `name`, `params_class`, `supports_exact_removal`, `removal_cost` and `localizes` (whether the
    method writes per-task masks), and implement [`merge_deltas`] (or override [`merge_tensor`]).

    Args:
        params (`MergeParams`, *optional*): The method's parameters; built from `kwargs` when omitted.
        **kwargs: Parameter values (see the method's `params_class`).
    """

    name: ClassVar[str]
    params_class: ClassVar[type[MergeParams]] = MergeParams
    supports_exact_removal: ClassVar[bool] = False
    removal_cost: ClassVar[str] = REMOVAL_COST_ALL
    localizes: ClassVar[bool] = False

    def __init__(self, params: MergeParams | None = None, **kwargs: Any):
        if params is not None and kwargs:
            raise InvalidMergeParameterError("pass either `params` or keyword parameters, not both")
        if params is None:
            known = {f.name for f in dataclasses.fields(self.params_class)}
            unknown = sorted(set(kwargs) - known)
            if unknown:
                raise InvalidMergeParameterError(
                    f"{self.name} has no parameter(s) {unknown}; its parameters are {sorted(known)}"
                )
            params = self.params_class(**kwargs)
        elif not isinstance(params, self.params_class):
            raise InvalidMergeParameterError(f"{self.name} takes {self.params_class.__name__}, got {type(params)}")
        self.params = params

    def begin(self, task_ids: Sequence[str]) -> None:
        """Called once before the first tensor of a merge (resets per-merge state)."""
        self.task_ids = list(task_ids)

    def merge_deltas(self, name: str, deltas: list[torch.Tensor]) -> TensorMerge:
        """Merge the task vectors of one tensor; returns the merged task vector (compute dtype) and any masks."""
        raise NotImplementedError

    def merge_tensor(self, name: str, base: torch.Tensor, tuned: Sequence[torch.Tensor]) -> TensorMerge:
        """Merge one tensor of the base and of each finetuned model."""
        if not tuned:
            raise InvalidMergeParameterError("a merge needs at least one finetuned model")
        result = self.merge_deltas(name, task_vectors(base, tuned))
        merged = base.to(result.tensor.dtype) + result.tensor
        return TensorMerge(merged.to(base.dtype), result.masks)

    def summary(self) -> dict[str, Any]:
        """Results gathered over the whole merge (e.g. EMR's rescalers), recorded with the output."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "parameters": self.params.to_dict(),
            "supports_exact_removal": self.supports_exact_removal,
            "removal_cost": self.removal_cost,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


_METHODS: dict[str, type[MergeMethod]] = {}

M = typing.TypeVar("M", bound=type[MergeMethod])


def register_method(cls: M) -> M:
    """Class decorator: make a method available by its `name`."""
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise InvalidArgumentError(f"a merge method named {cls.name!r} is already registered")
    _METHODS[cls.name] = cls
    return cls


def _load_builtin_methods() -> None:
    """Import the modules of the built-in methods (they register themselves); a no-op once done."""
    from . import BUILTIN_METHODS

    for module in BUILTIN_METHODS.values():
        importlib.import_module(f".{module}", __package__)


def available_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    _load_builtin_methods()
    return sorted(_METHODS)


def get_method(name: str) -> type[MergeMethod]:
    """The method class registered as `name`."""
    _load_builtin_methods()
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMergeMethodError(
            f"unknown merge method {name!r}; available: {', '.join(available_methods())}"
        ) from None


def create_method(name: str, params: Mapping[str, Any] | None = None, **kwargs: Any) -> MergeMethod:
    """An instance of the method `name` with the given parameter values."""
    return get_method(name)(**{**dict(params or {}), **kwargs})


def _convert(text: str, annotation: Any, what: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return _convert(text, options[0], what)
    if origin is Literal:
        if text not in typing.get_args(annotation):
            raise InvalidMergeParameterError(f"{what} must be one of {typing.get_args(annotation)}, got {text!r}")
        return text
    if origin is tuple:
        inner = typing.get_args(annotation)[0]
        return tuple(_convert(part.strip(), inner, what) for part in text.split(",") if part.strip())
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise InvalidMergeParameterError(f"{what} must be true or false, got {text!r}")
    try:
        return annotation(text)
    except (TypeError, ValueError):
        raise InvalidMergeParameterError(f"{what} must be {annotation.__name__}, got {text!r}") from None


def parse_params(method: type[MergeMethod], assignments: Sequence[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings (command line) into typed parameter values of `method`.

    Tuples are comma-separated (``weights=1,0.5``); ``none`` clears an optional value.
    """
    hints = typing.get_type_hints(method.params_class)
    values: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in hints:
            raise InvalidMergeParameterError(
                f"bad parameter {assignment!r} for {method.name}; expected key=value with key in {sorted(hints)}"
            )
        values[key] = _convert(text.strip(), hints[key], f"{method.name} parameter {key!r}")
    return values


def check_weights(weights: tuple[float, ...] | None, count: int) -> torch.Tensor:
    """Per-model weights as a float32 tensor (all ones when `weights` is None)."""
    if weights is None:
        return torch.ones(count)
    if len(weights) != count:
        raise InvalidMergeParameterError(f"{len(weights)} weights given for {count} models")
    return torch.tensor(weights, dtype=torch.float32)


def check_fraction(value: float | None, what: str, allow_zero: bool = False) -> None:
    """Raise unless `value` (if set) lies in (0, 1] (or [0, 1] with `allow_zero`)."""
    if value is None:
        return
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        raise InvalidMergeParameterError(f"{what} must be in {'[' if allow_zero else '('}0, 1], got {value}")

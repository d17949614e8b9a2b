"""Which parameters SIFT tunes (the set P)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .errors import InvalidArgumentError, InvalidArgumentTypeError


# Input embeddings and language-model heads of the common architectures (tied or not).
DEFAULT_EXCLUDE: tuple[str, ...] = (
    r"(^|\.)(embed_tokens|wte|wpe|embed_positions|word_embeddings|position_embeddings|embed_in|shared)\.",
    r"(^|\.)(lm_head|embed_out)\.",
)


@dataclass(frozen=True)
class ParameterSelection:
    """Name patterns that pick the tuned parameters P out of a model's floating-point parameters.

    A parameter is tuned when its name matches one of `include` (or `include` is empty) and none of `exclude`.
    Patterns are regular expressions tested with `re.search`, so a plain module name such as `"q_proj"` matches
    every parameter under a `q_proj` module.

    Args:
        include (`tuple[str, ...]`, *optional*, defaults to `()`):
            Patterns a tuned parameter must match; empty means every parameter.
        exclude (`tuple[str, ...]`, *optional*, defaults to [`DEFAULT_EXCLUDE`]):
            Patterns of parameters never tuned. The default leaves out input embeddings and the LM head.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = field(default=DEFAULT_EXCLUDE)

    def __post_init__(self) -> None:
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as err:
                raise InvalidArgumentError(f"invalid parameter pattern {pattern!r}: {err}") from None

    def matches(self, name: str) -> bool:
        """Whether the parameter `name` is tuned."""
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return not any(re.search(p, name) for p in self.exclude)

    def resolve(self, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
        """Sorted names of the tuned floating-point entries of `state_dict`."""
        return sorted(n for n, t in state_dict.items() if t.is_floating_point() and self.matches(n))

    def to_dict(self) -> dict[str, list[str]]:
        return {"include": list(self.include), "exclude": list(self.exclude)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[str]]) -> ParameterSelection:
        return cls(include=tuple(data.get("include", ())), exclude=tuple(data.get("exclude", DEFAULT_EXCLUDE)))


def resolve_parameters(
    state_dict: Mapping[str, torch.Tensor], parameters: ParameterSelection | Iterable[str] | None
) -> tuple[ParameterSelection | None, list[str]]:
    """Turn the `parameters` argument of the public API into (selection or None, sorted names).

    `parameters` is a [`ParameterSelection`], an explicit list of names, or `None` for the default selection.
    """
    from .errors import ParameterMismatchError

    if parameters is None:
        parameters = ParameterSelection()
    if isinstance(parameters, ParameterSelection):
        names = parameters.resolve(state_dict)
        if not names:
            raise ParameterMismatchError("the parameter selection matches no floating-point parameter")
        return parameters, names
    if isinstance(parameters, str):
        raise InvalidArgumentTypeError("`parameters` is a ParameterSelection or a list of names, not a single string")
    names = sorted(set(parameters))
    missing = [n for n in names if n not in state_dict]
    if missing:
        raise ParameterMismatchError(f"{len(missing)} selected parameter(s) are not in the model, e.g. {missing[:3]}")
    not_float = [n for n in names if not state_dict[n].is_floating_point()]
    if not_float:
        raise ParameterMismatchError(f"selected parameters must be floating point, got {not_float[:3]}")
    if not names:
        raise ParameterMismatchError("the parameter selection is empty")
    return None, names

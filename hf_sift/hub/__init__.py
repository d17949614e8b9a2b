"""The Hugging Face Hub side of SIFT artifacts: resolve (download only what is needed), push and pull.

Names are imported on first use, so that `hf-sift push --help` and `hf-sift pull --help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


_LAZY = {
    "PushResult": ".push",
    "ResolvedArtifact": ".download",
    "artifact_allow_patterns": ".download",
    "pull_artifact": ".pull",
    "push_delta": ".push",
    "push_to_hub": ".push",
    "resolve_artifact": ".download",
    "resolve_delta_folder": ".download",
}

if TYPE_CHECKING:
    from .download import ResolvedArtifact, artifact_allow_patterns, resolve_artifact, resolve_delta_folder
    from .pull import pull_artifact
    from .push import PushResult, push_delta, push_to_hub


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_sift.hub' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "PushResult",
    "ResolvedArtifact",
    "artifact_allow_patterns",
    "pull_artifact",
    "push_delta",
    "push_to_hub",
    "resolve_artifact",
    "resolve_delta_folder",
]

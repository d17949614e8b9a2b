"""The Hugging Face Hub side of SIFT artifacts: resolve (download only what is needed), push, pull
and unlearn.

Names are imported on first use, so that `hf-sift push --help` and `hf-sift pull --help` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports


_LAZY = {
    "HubUnlearningReport": ".unlearn",
    "PushResult": ".push",
    "ResolvedArtifact": ".download",
    "artifact_allow_patterns": ".download",
    "pull_artifact": ".pull",
    "push_delta": ".push",
    "push_to_hub": ".push",
    "resolve_artifact": ".download",
    "resolve_delta_folder": ".download",
    "unlearn_repo": ".unlearn",
}

if TYPE_CHECKING:
    from .download import ResolvedArtifact, artifact_allow_patterns, resolve_artifact, resolve_delta_folder
    from .pull import pull_artifact
    from .push import PushResult, push_delta, push_to_hub
    from .unlearn import HubUnlearningReport, unlearn_repo


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "HubUnlearningReport",
    "PushResult",
    "ResolvedArtifact",
    "artifact_allow_patterns",
    "pull_artifact",
    "push_delta",
    "push_to_hub",
    "resolve_artifact",
    "resolve_delta_folder",
    "unlearn_repo",
]

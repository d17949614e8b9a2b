"""The Hugging Face Hub side of SIFT artifacts: resolve (download only what is needed), push and pull."""

from .download import ResolvedArtifact, artifact_allow_patterns, resolve_artifact, resolve_delta_folder
from .pull import pull_artifact
from .push import PushResult, push_delta, push_to_hub


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

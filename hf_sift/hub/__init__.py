"""Resolving SIFT artifacts stored on the Hugging Face Hub (or in local folders) to local files."""

from .download import ResolvedArtifact, artifact_allow_patterns, resolve_artifact


__all__ = ["ResolvedArtifact", "artifact_allow_patterns", "resolve_artifact"]

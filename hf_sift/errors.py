"""Errors raised by hf_sift: every error class of the library is defined here.

Every error derives from [`SiftError`]. Errors caused by bad input also derive from `ValueError`, so callers
that already catch `ValueError` keep working; a replay that does not reproduce the recorded task vector also
derives from `RuntimeError`. Errors that report a failed check of data against what was recorded for it (a digest,
a file of an artifact) also derive from [`IntegrityError`].

The `hf-sift` command prints one line for any of them and exits with code 1 for an [`IntegrityError`] and 2 for
every other error caused by bad input (see docs/troubleshooting.md).
"""

from __future__ import annotations

from typing import Any


class SiftError(Exception):
    """Base class of every hf_sift error."""


class IntegrityError(SiftError):
    """A check of data against what was recorded for it failed (a digest, the files of an artifact)."""


class InvalidArgumentError(SiftError, ValueError):
    """An argument has a value hf_sift cannot use: out of range, malformed, or not supported."""


class InvalidArgumentTypeError(InvalidArgumentError, TypeError):
    """An argument has the wrong type (also a `TypeError`, as Python raises for those)."""


class CommandLineError(InvalidArgumentError):
    """A command-line flag is missing, unknown, or its value cannot be parsed (`hf-sift` exits with code 2)."""


class PathNotFoundError(SiftError, ValueError):
    """An input folder or file does not exist (and, for a name that could be a Hub repo id, the Hub lacks it too)."""


class OutputDirError(SiftError, ValueError):
    """An output folder cannot be written: it is not empty (and overwriting was not asked for), or it is, holds,
    or lies inside one of the inputs."""


class InvalidTaskIdError(SiftError, ValueError):
    """A task id is empty, too long, or could escape or break a path (`..`, `/`, `\\`, control characters)."""


class UnknownTaskError(SiftError, KeyError, ValueError):
    """A task id is not part of the merge."""

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0]) if self.args else ""


class DuplicateTaskError(SiftError, ValueError):
    """A task id is already part of the merge."""


class ParameterMismatchError(SiftError, ValueError):
    """Parameter names, shapes or dtypes differ between two objects that must share them."""


class BaseModelMismatchError(IntegrityError, ValueError):
    """The base model (θ0) differs from the one the delta or task vector was built on."""


class SignSeedMismatchError(SiftError, ValueError):
    """Two objects that must share a sign vector were built with different sign seeds or scale bits."""


class TaskDigestMismatchError(IntegrityError, ValueError, RuntimeError):
    """A task vector does not reproduce the digest recorded for its task; it is never subtracted."""


class AccumulatorOverflowError(SiftError, ValueError, OverflowError):
    """An integer sum would leave the int64 range; hf_sift never wraps."""


class CorruptArtifactError(IntegrityError, ValueError):
    """A file of a SIFT artifact is missing, truncated, or does not match its recorded digest."""


class LocalHubHTTPError(SiftError, RuntimeError):
    """The error answer of the local Hub (`hf_sift.testing.hub_server`) to a request: HTTP `status`, the
    `X-Error-Code` header `code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`) and `message`. Raised inside
    the server and turned into the HTTP answer; its clients see the `huggingface_hub` errors of those answers."""

    def __init__(
        self, status: int, message: str, code: str | None = None, commit: str | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit, self.extra = status, message, code, commit, extra


class IncompatibleArtifactError(SiftError, ValueError):
    """The artifact was written in a format version this release cannot read."""


class MissingBaseModelError(SiftError, ValueError):
    """The artifact does not name its base model and none was given."""


class ServingDtypeError(SiftError, ValueError):
    """The requested dtype cannot hold the served weights (it is not floating point, or they overflow it)."""


class ReservedArgumentError(SiftError, ValueError):
    """An argument cannot be passed through to another library: hf_sift sets it itself, or it would change the
    weights hf_sift computes (e.g. a quantization config for the base model it serves on)."""


class UnsupportedOffloadError(SiftError, ValueError):
    """A tuned parameter of the base model is offloaded (on the `meta` device) in a way hf_sift cannot serve."""


class ConcurrentUpdateError(SiftError, RuntimeError):
    """An artifact changed since the writer read it (another process saved it in between), or a save would replace
    an artifact the writer never loaded. Nothing was written: reload the artifact, reapply the change, save again."""


class InvalidScaleError(SiftError, ValueError):
    """The scale of the merged update is not a finite number (NaN or infinite scales would serve NaN or inf)."""


class RemoteCodeError(SiftError, ValueError):
    """A model's config asks for custom code (`auto_map`); hf_sift never runs code from a model repo or folder."""


class UnsupportedHubPushError(SiftError, ValueError):
    """`push_to_hub` of a served model would publish a plain checkpoint without the SIFT artifact's files; or the
    artifact merges a peft adapter, which is not published yet."""


class DeltaNotKeptError(SiftError, RuntimeError):
    """A served model loaded with `keep_delta=False` dropped the sum, so it cannot switch task."""


class UnlearningLogError(SiftError, ValueError):
    """An entry cannot be appended to an unlearning log (it would not continue the chain, or is malformed)."""


class TaskVectorStoreError(SiftError, ValueError):
    """A task-vector store cannot be used as asked (e.g. it lies inside an artifact that would publish it)."""


class ReplayPreconditionError(SiftError, ValueError):
    """A task cannot be replayed as recorded (its rows, recipe or training arguments differ); nothing was trained."""


class EnvironmentMismatchError(ReplayPreconditionError):
    """The environment (library versions, device model, thread count) differs from the one a task was trained in."""


class MixedRecipeError(SiftError, ValueError):
    """Resuming an artifact with another recipe (training arguments, data, tokenizer, adapter) than its tasks'."""


class InvalidSIFTConfigError(SiftError, ValueError):
    """A SIFT training argument is invalid."""


class MissingReferenceError(SiftError, ValueError):
    """A checkpoint being resumed holds no SIFT reference (θ0 and sign seed)."""


class CheckpointError(SiftError, ValueError):
    """A checkpoint folder is missing, unreadable, or lacks a tensor the merge needs."""


class UnknownMergeMethodError(SiftError, KeyError, ValueError):
    """No merge method is registered under that name."""

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0]) if self.args else ""


class HubServerError(SiftError, ValueError):
    """A local Hub server (`hf_sift.testing.hub_server`) was given an invalid option: a non-loopback address or an
    unknown route for a fault."""


class HubTransferError(SiftError, RuntimeError):
    """A push did not complete: the connection to the Hub dropped or the Hub failed. A commit lands whole or not at
    all, so the branch is either unchanged or holds the whole new commit; pushing again uploads only what is
    missing."""


class InvalidMergeParameterError(SiftError, ValueError):
    """A merge parameter is unknown, of the wrong type, or out of range."""


__all__ = [
    "AccumulatorOverflowError",
    "BaseModelMismatchError",
    "CheckpointError",
    "CommandLineError",
    "ConcurrentUpdateError",
    "CorruptArtifactError",
    "DeltaNotKeptError",
    "DuplicateTaskError",
    "EnvironmentMismatchError",
    "HubServerError",
    "HubTransferError",
    "IncompatibleArtifactError",
    "IntegrityError",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "InvalidMergeParameterError",
    "InvalidSIFTConfigError",
    "InvalidScaleError",
    "InvalidTaskIdError",
    "LocalHubHTTPError",
    "MissingBaseModelError",
    "MissingReferenceError",
    "MixedRecipeError",
    "OutputDirError",
    "ParameterMismatchError",
    "PathNotFoundError",
    "RemoteCodeError",
    "ReplayPreconditionError",
    "ReservedArgumentError",
    "ServingDtypeError",
    "SiftError",
    "SignSeedMismatchError",
    "TaskDigestMismatchError",
    "TaskVectorStoreError",
    "UnknownMergeMethodError",
    "UnknownTaskError",
    "UnlearningLogError",
    "UnsupportedHubPushError",
    "UnsupportedOffloadError",
]

"""Where an input comes from: a local folder, or else a Hugging Face Hub repo id; and what to say when neither has it.

A name that cannot be a repo id (`./model`, `/data/model`, `a/b/c`) is a local path, so a missing one is reported as
a folder that does not exist, without asking the Hub. A name that could be either (`model`, `user/model`) is looked
up on the Hub when no such folder exists, and a failed look-up says both: no such folder here, and not on the Hub.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import PathNotFoundError


def could_be_repo_id(name: str | os.PathLike) -> bool:
    """Whether `name` is a valid Hub repo id (`model` or `namespace/model`); paths like `./x` or `/x` are not."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(name, str) or "\\" in name or name.startswith("~"):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_hub_source(name: str | os.PathLike) -> bool:
    """Whether `name` is read from the Hub: no such local path exists, and it could be a repo id."""
    return not Path(name).expanduser().exists() and could_be_repo_id(name)


def check_source(name: str | os.PathLike, what: str) -> None:
    """Raise [`~hf_sift.errors.PathNotFoundError`] when `name` is neither an existing path nor a possible repo id.

    Args:
        name (`str` or `os.PathLike`): The folder (or file) or repo id given.
        what (`str`): What it is, for the message (e.g. `"--model"`, `"the artifact"`).
    """
    if not Path(name).expanduser().exists() and not could_be_repo_id(name):
        raise PathNotFoundError(f"{what} {str(name)!r}: no such folder or file")


def not_found(name: str | os.PathLike, what: str, reason: BaseException) -> PathNotFoundError:
    """The error for a name that is not a local folder and that the Hub (or the local Hub cache) lacks too."""
    first_line = next((line.strip() for line in str(reason).splitlines() if line.strip()), type(reason).__name__)
    return PathNotFoundError(
        f"{what} {str(name)!r}: no such folder here, and not found on the Hugging Face Hub either ({first_line})"
    )


@contextlib.contextmanager
def hub_lookup(name: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn the errors of loading `name` from the Hub (with huggingface_hub or transformers) into one clear error.

    A name that exists locally is left alone: errors reading a local folder are not "not found" errors.
    """
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    check_source(name, what)
    hub_errors = (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    try:
        yield
    except hub_errors as err:
        if Path(name).expanduser().exists():
            raise
        raise not_found(name, what, err) from err
    except OSError as err:  # transformers wraps the Hub's errors in OSError
        if Path(name).expanduser().exists() or not isinstance(err.__cause__ or err.__context__, hub_errors):
            raise
        raise not_found(name, what, err) from err

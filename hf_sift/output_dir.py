"""The rule every command that writes a folder follows: an output never deletes anything that was there.

An output folder that exists and is not empty is refused unless overwriting was asked for (`--overwrite`), and an
output that is, holds, or lies inside one of the command's inputs (the base model, the models merged, the artifact
served, the data) is refused outright, with or without `--overwrite`: writing it would replace or mix with the
inputs being read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import OutputDirError


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _overlaps(output: Path, source: Path) -> str | None:
    if output == source:
        return "is"
    if output.is_relative_to(source):
        return "lies inside"
    if source.is_relative_to(output):
        return "holds"
    return None


def check_output_dir(
    output: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None] = (),
    *,
    overwrite: bool = False,
    flag: str = "--output",
    may_continue: bool = False,
) -> Path:
    """Check that `output` can be written without destroying anything; returns its resolved path.

    Args:
        output (`str` or `os.PathLike`): The output folder.
        inputs (`Iterable`, *optional*): The command's inputs (folders or files); `None` and names that are not
            local paths (Hub repo ids) are skipped.
        overwrite (`bool`, *optional*, defaults to `False`): Accept an existing, non-empty output folder.
        flag (`str`, *optional*, defaults to `"--output"`): The flag the output was given with, for the message.
        may_continue (`bool`, *optional*, defaults to `False`): The output is an existing result the command
            continues (e.g. an artifact `train` resumes): accept it without `overwrite`.

    Raises:
        [`~hf_sift.errors.OutputDirError`]: The output is, holds or lies inside an input (always), is a file, or
            is a non-empty folder and neither `overwrite` nor `may_continue` is set.
    """
    target = _resolved(output)
    for source in inputs:
        if source is None or not os.path.exists(source):
            continue
        relation = _overlaps(target, _resolved(source))
        if relation is not None:
            raise OutputDirError(
                f"{flag} {str(output)!r} {relation} the input {str(source)!r}: writing it would destroy the input; "
                "choose another output folder"
            )
    if target.exists() and not target.is_dir():
        raise OutputDirError(f"{flag} {str(output)!r} is a file, not a folder")
    if target.is_dir() and any(target.iterdir()) and not (overwrite or may_continue):
        raise OutputDirError(
            f"{flag} {str(output)!r} already exists and is not empty; pass --overwrite to replace what it holds, "
            "or choose another output folder"
        )
    return target

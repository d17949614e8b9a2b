"""Validation of task ids: they name files, so nothing that could escape or break a path is accepted."""

from __future__ import annotations

import unicodedata

from .errors import InvalidTaskIdError


MAX_TASK_ID_LENGTH = 128
_FORBIDDEN = set('/\\<>:"|?*')


def validate_task_id(task_id: object) -> str:
    """Return `task_id` if it is a safe task id, else raise [`~hf_sift.errors.InvalidTaskIdError`].

    A task id is a non-empty string of at most 128 characters, with no path separator (``/``, ``\\``), none of
    ``<>:"|?*``, no control or format character, no leading dot (which also rules out ``.`` and ``..``) and no
    leading or trailing whitespace. Integers are accepted and turned into their decimal string.
    """
    if isinstance(task_id, int) and not isinstance(task_id, bool):
        task_id = str(task_id)
    if not isinstance(task_id, str):
        raise InvalidTaskIdError(f"a task id is a string, got {type(task_id).__name__}")
    if not task_id:
        raise InvalidTaskIdError("a task id cannot be empty")
    if len(task_id) > MAX_TASK_ID_LENGTH:
        raise InvalidTaskIdError(f"task id is {len(task_id)} characters long; at most {MAX_TASK_ID_LENGTH} allowed")
    if task_id.startswith("."):
        raise InvalidTaskIdError(f"task id {task_id!r} cannot start with '.'")
    if task_id != task_id.strip():
        raise InvalidTaskIdError(f"task id {task_id!r} cannot start or end with whitespace")
    bad = sorted({c for c in task_id if c in _FORBIDDEN or unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")})
    if bad:
        raise InvalidTaskIdError(f"task id {task_id!r} contains forbidden character(s) {bad}")
    return task_id

"""The `--text-template` of the commands that tokenize rows of a data file: a Python format string over columns.

The template is checked against the data's columns before any row is tokenized, so that a typo in a column name
or an unbalanced brace is one clear error naming the flag, not a `KeyError` from inside `datasets.map`.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import CommandLineError


def _field_root(field_name: str) -> str:
    """`"question"` for `"question"`, `"row.text"` or `"row[0]"`."""
    return field_name.split(".", 1)[0].split("[", 1)[0]


def check_text_template(template: str, columns: Iterable[str], flag: str = "--text-template") -> None:
    """Raise [`~hf_sift.errors.CommandLineError`] unless `template` is a format string over named `columns`.

    Args:
        template (`str`): E.g. `"Question: {question}\\nAnswer: {answer}"`.
        columns (`Iterable[str]`): The column names of the data.
        flag (`str`, *optional*, defaults to `"--text-template"`): The flag, for the message.
    """
    columns = list(columns)
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise CommandLineError(f"{flag} {template!r} is not a valid format string: {err}") from None
    if not fields:
        raise CommandLineError(f"{flag} {template!r} names no column; put column names in braces, e.g. {{text}}")
    for name in fields:
        root = _field_root(name)
        if not root or root.isdigit():
            raise CommandLineError(f"{flag} {template!r}: name a column in braces ({{text}}), not {{{name}}}")
        if root not in columns:
            raise CommandLineError(f"{flag} {template!r}: the data has no column {root!r}; its columns are {columns}")


def render_text_template(template: str, row: Mapping[str, Any], flag: str = "--text-template") -> str:
    """`template.format(**row)`, with the errors a row can still cause (e.g. `{text[5]}`) naming the flag."""
    try:
        return template.format(**row)
    except (KeyError, IndexError, AttributeError, TypeError, ValueError) as err:
        raise CommandLineError(f"{flag} {template!r} cannot format a row: {type(err).__name__}: {err}") from None

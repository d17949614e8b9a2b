"""hf_sift never runs code shipped with a model: configs that ask for it are refused before anything is loaded.

Every model, config and tokenizer hf_sift loads goes through transformers with `trust_remote_code=False`. That
alone does not refuse a config whose `auto_map` names custom classes when its `model_type` is also a built-in one
(transformers then silently uses the built-in class, which is not the model its authors meant), and an interactive
terminal may be asked whether to run the code. [`refuse_remote_code`] reads `config.json` (and
`tokenizer_config.json`) as JSON, executing nothing, and raises [`~hf_sift.errors.RemoteCodeError`] on `auto_map`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import RemoteCodeError


_FILES = ("config.json", "tokenizer_config.json")


def _read_json(name_or_path: str, filename: str, revision: str | None, hub_kwargs: dict[str, Any]) -> Any:
    local = Path(name_or_path)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            return None
    else:
        from transformers.utils import cached_file

        try:
            found = cached_file(
                name_or_path,
                filename,
                revision=revision,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                **hub_kwargs,
            )
        except (OSError, ValueError):  # no such repo: transformers reports it when it loads the model
            return None
        if found is None:
            return None
        path = Path(found)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable: transformers reports it when it loads the file


def refuse_remote_code(name_or_path: str | os.PathLike, revision: str | None = None, **hub_kwargs: Any) -> None:
    """Raise [`~hf_sift.errors.RemoteCodeError`] if the model's config or tokenizer config asks for custom code.

    Args:
        name_or_path (`str` or `os.PathLike`): A model folder or Hub repo id.
        revision (`str`, *optional*): Revision of the Hub repo.
        hub_kwargs: `cache_dir`, `token`, `local_files_only`, ... for `transformers.utils.cached_file`.
    """
    name_or_path = str(name_or_path)
    for filename in _FILES:
        data = _read_json(name_or_path, filename, revision, hub_kwargs)
        if isinstance(data, dict) and data.get("auto_map"):
            raise RemoteCodeError(
                f"{filename} of {name_or_path} asks for custom code (auto_map: {sorted(data['auto_map'])}); hf_sift "
                "never runs code from a model and loads with trust_remote_code=False. Use a model whose "
                "architecture transformers implements, or remove 'auto_map' if the built-in class is the right one"
            )

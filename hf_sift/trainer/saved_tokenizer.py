"""The tokenizer (or processor) a run was given, saved next to the artifact it trained.

An artifact pulled from the Hub, or loaded with `AutoTokenizer.from_pretrained(artifact)` (format 2 holds the
transformers `config.json` of the plain merge beside it), then has the tokenizer its tasks were trained with. The
files are the user's side of the artifact folder: artifact saves keep them, and a push uploads them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ..artifact import is_artifact_file
from ..atomic import write_file_atomic
from ..folder_lock import folder_lock
from .recipe_hashes import saved_content_bytes


def save_processing_class(processing_class: Any, output_dir: str | os.PathLike) -> list[str]:
    """Write what `processing_class.save_pretrained` writes into `output_dir`, one file at a time, atomically.

    Only missing files are written: a file the folder already holds is kept (with a warning when it differs, as
    after a resume with `allow_mixed_recipes` and another tokenizer; each task's recipe records its own), and a file
    the artifact itself owns (a `config.json` a processor might save) is never written. Objects without
    `save_pretrained` (a plain collator function) save nothing.

    Args:
        processing_class: The tokenizer or processor given to [`~hf_sift.trainer.train_tasks`].
        output_dir (`str` or `os.PathLike`): The artifact folder (created when missing).

    Returns:
        `list[str]`: The files written (relative to `output_dir`), sorted.
    """
    if processing_class is None or not hasattr(processing_class, "save_pretrained"):
        return []
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    kept: list[str] = []
    with tempfile.TemporaryDirectory(prefix=f".{output_dir.name}.tokenizer-", dir=output_dir.parent) as tmp:
        processing_class.save_pretrained(tmp)
        saved = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        for path in saved:
            if path.name == "tokenizer.json":
                _drop_call_state(path)
        with folder_lock(output_dir):  # not while an artifact save swaps the folder
            for source in saved:
                relative = source.relative_to(tmp).as_posix()
                target = output_dir / relative
                if is_artifact_file(relative):
                    continue
                if target.exists():
                    if not target.is_file() or saved_content_bytes(target) != saved_content_bytes(source):
                        kept.append(relative)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                write_file_atomic(target, lambda path, source=source: shutil.copyfile(source, path))
                written.append(relative)
    if kept:
        warnings.warn(
            f"{output_dir} already holds {', '.join(kept)} with other content than the tokenizer of this run: kept "
            "as they are (the run's tokenizer is recorded in each new task's recipe)",
            stacklevel=3,
        )
    return written


def _drop_call_state(path: Path) -> None:
    """Rewrite a fast tokenizer's `tokenizer.json` without the truncation and padding of its last call.

    A fast tokenizer saves the truncation and padding its last call set, so the same tokenizer would be saved
    differently after tokenizing (or not, when `datasets` read the tokenized rows from its cache). Both are cleared,
    as in a tokenizer never called, and the file is always rewritten the same way, so equal tokenizers give equal
    bytes.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return
    if isinstance(data, dict) and "truncation" in data and "padding" in data:
        data["truncation"], data["padding"] = None, None
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")

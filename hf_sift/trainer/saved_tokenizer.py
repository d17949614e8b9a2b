"""The tokenizer (or processor) a run was given, saved next to the artifact it trained.

An artifact pulled from the Hub, or loaded with `AutoTokenizer.from_pretrained(artifact)` (format 2 holds the
transformers `config.json` of the plain merge beside it), then has the tokenizer its tasks were trained with. The
files are the user's side of the artifact folder: artifact saves keep them, and a push uploads them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..artifact import is_artifact_file
from ..atomic import write_file_atomic
from ..folder_lock import folder_lock


def save_processing_class(processing_class: Any, output_dir: str | os.PathLike) -> list[str]:
    """Write what `processing_class.save_pretrained` writes into `output_dir`, one file at a time, atomically.

    Files whose bytes already match are left alone; a file the artifact itself owns (a `config.json` a processor
    might save) is never written. Objects without `save_pretrained` (a plain collator function) save nothing.

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
    written = []
    with tempfile.TemporaryDirectory(prefix=f".{output_dir.name}.tokenizer-", dir=output_dir.parent) as tmp:
        processing_class.save_pretrained(tmp)
        saved = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        with folder_lock(output_dir):  # not while an artifact save swaps the folder
            for source in saved:
                relative = source.relative_to(tmp).as_posix()
                target = output_dir / relative
                if is_artifact_file(relative) or (target.is_file() and target.read_bytes() == source.read_bytes()):
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                write_file_atomic(target, lambda path, source=source: shutil.copyfile(source, path))
                written.append(relative)
    return written

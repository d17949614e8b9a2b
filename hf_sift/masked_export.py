"""Export one served task of a [`~hf_sift.MergedMaskedModel`] as a plain transformers checkpoint."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from .atomic import apply_umask, keep_file, link_or_copy, staged_folder
from .hub.download import TOKENIZER_PATTERNS


EXPORT_RECORD_NAME = "sift_export.json"

# Files of a transformers checkpoint that an export replaces rather than keeps.
CHECKPOINT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*", "config.json")


def export_checkpoint(
    model: PreTrainedModel,
    folder: Path,
    artifact_folder: Path,
    record: Mapping[str, Any],
    **kwargs: Any,
) -> None:
    """Save `model` into `folder` atomically with the artifact's tokenizer files and `record` as `sift_export.json`.

    The user's other files in `folder` are kept; a previous checkpoint's weights and config are replaced.
    """
    with staged_folder(folder) as stage:
        model.save_pretrained(stage, **kwargs)
        for path in stage.rglob("*"):  # transformers writes its safetensors files 0600
            if path.is_file():
                apply_umask(path)
        for path in sorted(artifact_folder.iterdir()):
            if any(fnmatch.fnmatch(path.name, p) for p in TOKENIZER_PATTERNS) and not (stage / path.name).exists():
                link_or_copy(path, stage / path.name)  # copied through a Hub cache link, never linked to its blob
        (stage / EXPORT_RECORD_NAME).write_text(json.dumps(dict(record), indent=2, sort_keys=True) + "\n")
        if folder.is_dir():  # keep the user's other files, not a previous checkpoint's weights
            for path in folder.rglob("*"):
                relative = path.relative_to(folder)
                keep = not any(fnmatch.fnmatch(relative.as_posix(), p) for p in CHECKPOINT_PATTERNS)
                if path.is_file() and keep and not (stage / relative).exists():
                    keep_file(path, stage / relative)

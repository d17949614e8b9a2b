"""The model card of a pushed SIFT artifact, built with `huggingface_hub.ModelCard` and `ModelCardData`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


CARD_TAGS = ("hf-sift", "sift-masks", "merge", "unlearning")
# Tasks listed by name in the card; a repo with more says how many and lists the first ones.
MAX_LISTED_TASKS = 50


def dataset_ids(records: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Hub dataset ids recorded in the tasks' metadata (`dataset` or `datasets` keys), when there are any."""
    found: list[str] = []
    for record in records.values():
        metadata = record.get("metadata") or {}
        values = metadata.get("datasets", metadata.get("dataset"))
        for value in [values] if isinstance(values, str) else values or []:
            if isinstance(value, str) and value not in found:
                found.append(value)
    return found


def build_model_card(
    repo_id: str,
    base_model: str,
    base_revision: str | None,
    records: Mapping[str, Mapping[str, Any]],
    license: str | None = None,
    datasets: Sequence[str] | None = None,
    unlearning_log: Sequence[Mapping[str, Any]] | None = None,
    *,
    plain_merge: bool = False,
) -> str:
    """The README.md of a pushed artifact: YAML metadata, then how to load it, its tasks and its unlearning log.

    The text depends only on its arguments (no dates), so pushing the same artifact again leaves the card unchanged.

    Args:
        repo_id (`str`): The repo the card is for (used in the loading examples).
        base_model (`str`): Hub id of the base model.
        base_revision (`str`, *optional*): The base model's commit the artifact was built on.
        records (`Mapping`): The manifest's task records.
        license (`str`, *optional*): The license identifier for the card's metadata.
        datasets (`Sequence[str]`, *optional*): Hub dataset ids; defaults to the ones the tasks' metadata records.
        unlearning_log (`Sequence[Mapping]`, *optional*): Entries of the artifact's unlearning log, if it has one.
        plain_merge (`bool`, *optional*, defaults to `False`): Whether the repo holds the plain merge as a
            transformers checkpoint (format 2), which plain `transformers` loads.
    """
    from huggingface_hub import ModelCard, ModelCardData

    task_ids = sorted(records)
    datasets = list(datasets) if datasets is not None else dataset_ids(records)
    data = ModelCardData(
        base_model=base_model,
        library_name="hf-sift",
        license=license,
        datasets=datasets or None,
        tags=list(CARD_TAGS),
    )
    first = task_ids[0] if task_ids else "TASK_ID"
    listed = ", ".join(f"`{t}`" for t in task_ids[:MAX_LISTED_TASKS])
    more = f" and {len(task_ids) - MAX_LISTED_TASKS} more" if len(task_ids) > MAX_LISTED_TASKS else ""
    at = f" at commit `{base_revision}`" if base_revision else ""
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A SIFT-Masks merge of **{len(task_ids)} task{'s' if len(task_ids) != 1 else ''}** fine-tuned from "
        f"[{base_model}](https://huggingface.co/{base_model}){at}, written by hf_sift. Each task keeps a sparse mask, so one task can be served "
        "from the merge, and a task can be removed exactly (unlearned) without retraining the others.",
        "",
        "## Load one task",
        "",
        "```python",
        "from hf_sift import MergedMaskedModel",
        "",
        f'model = MergedMaskedModel.from_pretrained("{repo_id}", task="{first}")',
        "```",
        "",
        "This downloads the SIFT config and manifest, the merged weights and that task's mask only (never the other "
        "tasks' masks), with the base model recorded in `sift_config.json` where it is needed. `task=None` serves "
        f"the plain merge of all tasks. From the command line: `hf-sift pull {repo_id} --task {first} -o DIR`.",
        "",
    ]
    if plain_merge:
        lines += [
            "The plain merge of all tasks is also a standard checkpoint:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
            "```",
            "",
        ]
    lines += [
        "## Tasks",
        "",
        f"{len(task_ids)} task{'s are' if len(task_ids) != 1 else ' is'} merged: {listed or 'none'}{more}.",
        "",
        "## Unlearning log",
        "",
    ]
    if unlearning_log:
        lines += [
            f"{len(unlearning_log)} task{'s were' if len(unlearning_log) != 1 else ' was'} removed from this merge "
            "(most recent last; the log, `sift_unlearning_log.jsonl`, is a hash chain that `hf-sift verify` checks):",
            "",
        ]
        lines += [f"- {_log_line(entry)}" for entry in unlearning_log]
    else:
        lines.append(
            "This artifact carries no unlearning log. Earlier revisions of this repo may hold tasks that are no "
            "longer merged; see the commit history."
        )
    card = ModelCard.from_template(
        data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n", body="\n".join(lines)
    )
    return str(card)


def _log_line(entry: Mapping[str, Any]) -> str:
    """One removal of the unlearning log, in words (see `hf_sift.unlearning_log` for the entries)."""
    task = f"task `{entry['task_id']}`" if "task_id" in entry else "a task (its id is recorded only as a salted hash)"
    cost = entry.get("cost") or {}
    spent = ", ".join(f"{key} {value}" for key, value in sorted(cost.items()))
    line = (
        f"{entry.get('time', '?')}: removed {task}; sum `{entry.get('digest_before')}` → `{entry.get('digest_after')}`"
    )
    return f"{line} ({spent})" if spent else line

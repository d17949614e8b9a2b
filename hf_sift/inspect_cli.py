"""`hf-sift verify` and `hf-sift info`: check an artifact's files against each other, and describe it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


_SHOWN_TASKS = 5


def register(subparsers: argparse._SubParsersAction) -> None:
    verify = subparsers.add_parser(
        "verify",
        help="check every file of a merged SIFT artifact against the others",
        description=(
            "Recompute the digest of the sum and of each mask, and check the config, the manifest records, the masks "
            "and the unlearning log against each other. In format 2, also check each tensor of the plain merge P "
            "against its digest (the untuned ones against the base's) and, when the recorded base model is found "
            "without a download, recompute P's tuned tensors from the sum (else a warning says it was skipped). "
            "Exit 0 when every check holds, 1 with the list of what fails."
        ),
    )
    verify.add_argument("artifact", help="artifact folder")
    verify.add_argument(
        "--task-vector-store",
        "--task_vector_store",
        metavar="DIR",
        help="also check the artifact against the task vectors this private store holds (digests, masks, the sum)",
    )
    verify.set_defaults(func=run_verify)

    info = subparsers.add_parser(
        "info",
        help="describe a merged SIFT artifact (base, sign seed, tasks, sizes, log)",
        description="Print an artifact's base model, sign seed, S, tasks, sizes on disk, tuned elements and log.",
    )
    info.add_argument("artifact", help="artifact folder")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    info.set_defaults(func=run_info)


def _folder(path: str | None) -> None:
    from .errors import PathNotFoundError

    if path is not None and not Path(path).is_dir():
        raise PathNotFoundError(f"{path} is not a folder")


def run_verify(args: argparse.Namespace) -> int:
    from .verify import verify_artifact

    _folder(args.artifact)
    _folder(args.task_vector_store)
    problems = verify_artifact(args.artifact, args.task_vector_store)
    if not problems:
        print(f"{args.artifact}: every check holds")
        return 0
    print(f"{args.artifact}: {len(problems)} check(s) failed:")
    for problem in problems:
        print(f"  - {problem}")
    return 1


def artifact_info(directory: str | Path) -> dict[str, Any]:
    """What `hf-sift info` shows, as a JSON-serialisable dict (reads the JSON files and file sizes only)."""
    from .artifact import CONFIG_NAME, MANIFEST_NAME, MASKS_DIR, delta_files, read_config, read_manifest
    from .unlearning_log import LOG_NAME, UnlearningLog

    directory = Path(directory)
    config = read_config(directory)
    manifest = read_manifest(directory)
    log = UnlearningLog.load(directory)

    def size(*names: str) -> int:
        return sum((directory / n).stat().st_size for n in names if (directory / n).is_file())

    masks = sorted((directory / MASKS_DIR).glob("*")) if (directory / MASKS_DIR).is_dir() else []
    sizes = {
        "sum": size(*delta_files(directory), "sift_delta.safetensors.index.json"),
        "masks": sum(p.stat().st_size for p in masks if p.is_file()),
        "config_and_manifest": size(CONFIG_NAME, MANIFEST_NAME),
        "log": size(LOG_NAME),
    }
    sizes["total"] = sum(sizes.values())
    shapes = config.shapes
    elements = 0
    for shape in shapes.values():
        count = 1
        for dim in shape:
            count *= int(dim)
        elements += count
    tasks = sorted(manifest)
    return {
        "artifact": str(directory),
        "format_version": config.format_version,
        "hf_sift_version": config.hf_sift_version,
        "base_model": config.base_model,
        "base_revision": config.base_revision,
        "base_digest": config.base_digest,
        "base_model_digest": config.base_model_digest,
        "sign_seed": config.sign_seed,
        "scale_bits": config.scale_bits,
        "num_tasks": config.num_tasks,
        "tasks": tasks,
        "delta_digest": config.delta_digest,
        "tuned_parameters": len(shapes),
        "tuned_elements": elements,
        "mean_mask_density": (
            sum(float(r.get("mask_density", 0.0)) for r in manifest.values()) / len(manifest) if manifest else None
        ),
        "sizes": sizes,
        "log": log.entries,
    }


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def run_info(args: argparse.Namespace) -> int:
    _folder(args.artifact)
    info = artifact_info(args.artifact)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, ensure_ascii=False))
        return 0
    tasks = info["tasks"]
    shown = ", ".join(tasks[:_SHOWN_TASKS]) + (", ..." if len(tasks) > _SHOWN_TASKS else "")
    sizes = info["sizes"]
    density = info["mean_mask_density"]
    lines = [
        f"artifact:        {info['artifact']} (format {info['format_version']}, hf_sift {info['hf_sift_version']})",
        f"base model:      {info['base_model']} (revision {info['base_revision']})",
        f"base digest:     {info['base_digest']}",
        f"sign seed:       {info['sign_seed']}",
        f"scale bits S:    {info['scale_bits']}",
        f"tasks T:         {info['num_tasks']}" + (f" ({shown})" if tasks else ""),
        f"tuned:           {info['tuned_elements']:,} elements in {info['tuned_parameters']} tensors",
        f"mask density:    {'-' if density is None else f'{density:.4f} (mean over tasks)'}",
        f"sum digest:      {info['delta_digest']}",
        f"size on disk:    {_size(sizes['total'])} (sum {_size(sizes['sum'])}, masks {_size(sizes['masks'])}, "
        f"log {_size(sizes['log'])})",
        f"unlearning log:  {len(info['log'])} entr{'y' if len(info['log']) == 1 else 'ies'}",
    ]
    if len(info["log"]) > _SHOWN_TASKS:
        lines.append(f"  ... {len(info['log']) - _SHOWN_TASKS} earlier")
    for entry in info["log"][-_SHOWN_TASKS:]:
        task = entry.get("task_id", f"(redacted) {str(entry.get('task_hash'))[:24]}...")
        lines.append(f"  {entry.get('time')}  removed {task}  -> {entry.get('digest_after')}")
    print("\n".join(lines))
    return 0

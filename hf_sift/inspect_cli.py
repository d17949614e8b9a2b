"""`hf-sift verify` and `hf-sift info`: check an artifact's files against each other, and describe it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


_SHOWN_TASKS = 5


def register(subparsers: argparse._SubParsersAction) -> None:
    from .hub.cli import add_hub_options

    verify = subparsers.add_parser(
        "verify",
        help="check every file of a merged SIFT artifact against the others",
        description=(
            "Recompute the digest of the sum and of each mask, and check the config, the manifest records, the masks "
            "and the unlearning log against each other. In format 2, also check each tensor of the plain merge P "
            "against its digest (the untuned ones against the base's) and, when the recorded base model is found "
            "without a download, recompute P's tuned tensors from the sum (else a warning says it was skipped). "
            "Exit 0 when every check holds, 1 with the list of what fails. "
            "ARTIFACT is a folder or, when no such folder exists, a Hub repo id: the files the checks read are "
            "downloaded at one commit into the Hugging Face cache."
        ),
    )
    verify.add_argument("artifact", help="artifact folder or Hub repo id")
    verify.add_argument(
        "--task-vector-store",
        "--task_vector_store",
        metavar="DIR",
        help="also check the artifact against the task vectors this private store holds (digests, masks, the sum)",
    )
    add_hub_options(verify, optional_repo=True)
    verify.set_defaults(func=run_verify)

    info = subparsers.add_parser(
        "info",
        help="describe a merged SIFT artifact (base, sign seed, tasks, sizes, log)",
        description=(
            "Print an artifact's base model, sign seed, S, tasks, sizes, tuned elements and log. ARTIFACT is a folder "
            "or, when no such folder exists, a Hub repo id: only its config, manifest and log are downloaded (at one "
            "commit, into the Hugging Face cache), and sizes come from the repo's file listing."
        ),
    )
    info.add_argument("artifact", help="artifact folder or Hub repo id")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_hub_options(info, optional_repo=True)
    info.set_defaults(func=run_info)


def _folder(path: str | None) -> None:
    from .errors import PathNotFoundError

    if path is not None and not Path(path).is_dir():
        raise PathNotFoundError(f"{path} is not a folder")


def _source(args: argparse.Namespace) -> tuple[bool, dict[str, Any]]:
    """Whether ARTIFACT is read from the Hub (checking a local one is a folder), and the Hub options given."""
    from .hub.cli import hub_options
    from .hub.sources import is_hub_source

    if is_hub_source(args.artifact):
        return True, hub_options(args)
    _folder(args.artifact)
    if args.revision is not None or hub_options(args):
        from .errors import CommandLineError

        raise CommandLineError(
            f"{args.artifact} is a local folder: --revision, --cache-dir, --local-files-only and --token apply to a "
            "Hub repo id only"
        )
    return False, {}


def run_verify(args: argparse.Namespace) -> int:
    from .verify import verify_artifact

    from_hub, hub = _source(args)
    _folder(args.task_vector_store)
    name = args.artifact
    if from_hub:
        from .hub.download import resolve_delta_folder

        folder = resolve_delta_folder(args.artifact, args.revision, plain=True, **hub)
        name, problems = f"{args.artifact}@{folder.name}", verify_artifact(folder, args.task_vector_store)
    else:
        problems = verify_artifact(args.artifact, args.task_vector_store)
    if not problems:
        print(f"{name}: every check holds")
        return 0
    print(f"{name}: {len(problems)} check(s) failed:")
    for problem in problems:
        print(f"  - {problem}")
    return 1


def artifact_info(path_or_repo_id: str | Path, *, revision: str | None = None, **hub_kwargs: Any) -> dict[str, Any]:
    """What `hf-sift info` shows, as a JSON-serialisable dict (reads the JSON files and file sizes only).

    A Hub repo id (a name that is no local path) is described at one commit: `revision` is resolved once, only the
    config, manifest and log are downloaded (into the normal cache, with `hub_kwargs` such as `cache_dir`, `token`,
    `local_files_only`), and the sizes come from the repo's file listing (`None` offline). The dict then also holds
    `repo_id` and `revision` (the commit).
    """
    from .artifact import CONFIG_NAME, DELTA_INDEX_NAME, MANIFEST_NAME, MASKS_DIR, read_config, read_manifest
    from .hub.sources import is_hub_source
    from .plain_merge import is_plain_file
    from .unlearning_log import LOG_NAME, UnlearningLog

    where: dict[str, Any] = {"artifact": str(path_or_repo_id)}
    files: dict[str, int] | None
    if is_hub_source(path_or_repo_id):
        from .hub.download import resolve_metadata

        directory, files = resolve_metadata(str(path_or_repo_id), revision, **hub_kwargs)
        where.update(repo_id=str(path_or_repo_id), revision=directory.name)
    else:
        directory = Path(path_or_repo_id)
        files = {p.relative_to(directory).as_posix(): p.stat().st_size for p in directory.rglob("*") if p.is_file()}
    config = read_config(directory)
    manifest = read_manifest(directory)
    log = UnlearningLog.load(directory)

    def size(wanted: Any) -> int:
        return sum(n for name, n in (files or {}).items() if wanted(name))

    sizes: dict[str, int] | None = None
    if files is not None:
        sizes = {
            "sum": size(
                lambda n: n == DELTA_INDEX_NAME or (n.startswith("sift_delta") and n.endswith(".safetensors"))
            ),
            "plain": size(is_plain_file),
            "masks": size(lambda n: n.startswith(MASKS_DIR + "/")),
            "config_and_manifest": size(lambda n: n in (CONFIG_NAME, MANIFEST_NAME)),
            "log": size(lambda n: n == LOG_NAME),
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
        **where,
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
    from_hub, hub = _source(args)
    info = artifact_info(args.artifact, revision=args.revision, **hub) if from_hub else artifact_info(args.artifact)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, ensure_ascii=False))
        return 0
    tasks = info["tasks"]
    shown = ", ".join(tasks[:_SHOWN_TASKS]) + (", ..." if len(tasks) > _SHOWN_TASKS else "")
    sizes = info["sizes"]
    density = info["mean_mask_density"]
    at = f"@{info['revision']}" if "revision" in info else ""
    if sizes is None:
        on_disk = "unknown (offline: the cache keeps no listing of the repo's files)"
    else:
        on_disk = (
            f"{_size(sizes['total'])} (sum {_size(sizes['sum'])}, plain merge {_size(sizes['plain'])}, masks "
            f"{_size(sizes['masks'])}, log {_size(sizes['log'])})"
        )
    lines = [
        f"artifact:        {info['artifact']}{at} (format {info['format_version']}, hf_sift {info['hf_sift_version']})",
        f"base model:      {info['base_model']} (revision {info['base_revision']})",
        f"base digest:     {info['base_digest']}",
        f"sign seed:       {info['sign_seed']}",
        f"scale bits S:    {info['scale_bits']}",
        f"tasks T:         {info['num_tasks']}" + (f" ({shown})" if tasks else ""),
        f"tuned:           {info['tuned_elements']:,} elements in {info['tuned_parameters']} tensors",
        f"mask density:    {'-' if density is None else f'{density:.4f} (mean over tasks)'}",
        f"sum digest:      {info['delta_digest']}",
        f"size:            {on_disk}",
        f"unlearning log:  {len(info['log'])} entr{'y' if len(info['log']) == 1 else 'ies'}",
    ]
    if len(info["log"]) > _SHOWN_TASKS:
        lines.append(f"  ... {len(info['log']) - _SHOWN_TASKS} earlier")
    for entry in info["log"][-_SHOWN_TASKS:]:
        task = entry.get("task_id", f"(redacted) {str(entry.get('task_hash'))[:24]}...")
        lines.append(f"  {entry.get('time')}  removed {task}  -> {entry.get('digest_after')}")
    print("\n".join(lines))
    return 0

"""The publisher's story on a profile's SIFT artifact, through a local Hub server and the unmodified client.

A publisher pushes the merged TOFU artifact a profile's run left (`sift-merged`) to the Hub, a `from_pretrained`
user pulls one author, and a deletion request for one author arrives: `hf_sift.hub.unlearn_repo` replays that
author's training, checks the replay against its recorded digest, and publishes the artifact without it in one
commit whose parent was checked, then squashes the branch's history. The script then compares the published files
with a fresh push of a merge never trained on the author (trained here with `train_tasks`, kept in the work folder),
and serves a remaining author from the new head. Figures per phase: wall time, bytes uploaded, peak memory.

    python -m benchmarks.tofu.publish --profile cpu-steps [--forget author-183]

It starts its own Hub server (`hf_sift.testing.HubServer`) on a free loopback port, with its blobs and the
client's cache in a temporary folder of the work folder that it removes at the end. Writes
``benchmarks/results/tofu-<profile>-publish.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


REPO = Path(__file__).resolve().parents[2]


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (it only grows), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hub_tree(repo_id: str, revision: str | None = None) -> dict[str, str]:
    """Every file of a repo revision and its content address (sha256 for LFS files, the git blob id otherwise)."""
    from huggingface_hub import HfApi, RepoFile

    entries = HfApi().list_repo_tree(repo_id, revision=revision, recursive=True)
    return {e.path: (e.lfs.sha256 if e.lfs else e.blob_id) for e in entries if isinstance(e, RepoFile)}


def card_head(repo_id: str, revision: str, cache_dir: Path) -> str:
    """The model card up to its unlearning log, with the repo's own name taken out (the card names its repo; the
    names the study gives its repos appear nowhere else in a card)."""
    from huggingface_hub import hf_hub_download

    text = Path(hf_hub_download(repo_id, "README.md", revision=revision, cache_dir=cache_dir)).read_text()
    return text.partition("## Unlearning log")[0].replace(repo_id.split("/")[1], "<repo>")


def served_equal(left: Any, right: Any) -> bool:
    """Whether two served models have the same parameter names and bit-identical tensors."""
    import torch

    a, b = left.model.state_dict(), right.model.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def publish_study(
    profile: Any, data_dir: Path, work_dir: Path, cache_dir: Path, forget: str | None = None, namespace: str = "tofu"
) -> dict[str, Any]:
    """Run the publisher's story against the Hub `huggingface_hub` points at (`HF_ENDPOINT`); returns the figures.

    Args:
        profile (`Profile`): The profile whose run left `work_dir / "sift-merged"`.
        data_dir (`Path`): The TOFU files (the replay and the fresh merge need the training rows).
        work_dir (`Path`): The profile's work folder; the fresh merge is written to
            `sift-merged-without-<author>` there (and resumed by `train_tasks` if it exists).
        cache_dir (`Path`): The Hugging Face cache the downloads go to.
        forget (`str`, *optional*): The author of the deletion request; defaults to the last one merged.
        namespace (`str`, *optional*): Hub namespace of the repos created.
    """
    import torch
    from huggingface_hub import HfApi

    from hf_sift import MergedDelta, MergedMaskedModel, train_tasks
    from hf_sift.errors import UnknownTaskError
    from hf_sift.hub import push_to_hub, unlearn_repo
    from hf_sift.unlearning_log import LOG_NAME

    from .data import PadCollator, load_authors, training_dataset
    from .models import base_folder, load_model, load_tokenizer
    from .report import machine
    from .training import ScoreWhenTrained, sift_config  # a progress bar per training run (nothing is scored)

    artifact = work_dir / "sift-merged"
    if not (artifact / "sift_manifest.json").is_file():
        raise FileNotFoundError(
            f"no SIFT artifact in {artifact}: run `python -m benchmarks.tofu --profile {profile.name}`"
        )
    if profile.threads is not None:
        torch.set_num_threads(profile.threads)  # the replay must use the thread count of the training
    ids = MergedDelta.from_pretrained(artifact).task_ids
    forget = forget or ids[-1]
    if forget not in ids:
        raise ValueError(f"{forget!r} is not merged in {artifact} (it holds {', '.join(ids)})")
    remaining = [t for t in ids if t != forget]
    authors = load_authors(data_dir, list(profile.authors))
    base_dir = base_folder(profile.model, work_dir, authors)
    tokenizer = load_tokenizer(base_dir)
    dataset = training_dataset(tokenizer, authors)  # the rows train_tasks saw (the replay checks their digest)
    collator = PadCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    api = HfApi()
    base_repo, repo, fresh_repo = (f"{namespace}/{name}" for name in ("base", "published", "fresh"))
    phases: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def phase(name: str, **figures: Any):
        started = time.perf_counter()
        record: dict[str, Any] = dict(figures)
        yield record
        record["seconds"] = round(time.perf_counter() - started, 1)
        record["peak_rss_mib"] = round(peak_rss_mib())
        phases[name] = record
        print(f"{name}: {record['seconds']} s", file=sys.stderr)

    with phase("upload the base model") as record:
        api.create_repo(base_repo, exist_ok=True)
        record["commit"] = api.upload_folder(folder_path=base_dir, repo_id=base_repo).oid
    with phase("push the artifact") as record:
        pushed = push_to_hub(artifact, repo, base_model=base_repo)
        record.update(bytes_uploaded=pushed.bytes_uploaded, files=len(pushed.uploaded), commit=pushed.commit)
    pulled_task = remaining[0]
    with phase("pull one author (from_pretrained)", task=pulled_task) as record:
        served = MergedMaskedModel.from_pretrained(repo, task=pulled_task, cache_dir=cache_dir)
    local = MergedMaskedModel.from_pretrained(artifact, task=pulled_task, base_model=base_dir)
    record["equal_to_local"] = served_equal(served, local)
    del served, local

    model = load_model(base_dir)
    fresh = work_dir / f"sift-merged-without-{forget}"
    with phase("train the fresh merge of the others", tasks=remaining) as record:
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its end-of-training metrics
            train_tasks(
                model, dataset, task_column="author", args=sift_config(profile, work_dir / "runs"), output_dir=fresh,
                tasks=remaining, data_collator=collator, base_model=str(base_dir), callbacks=[ScoreWhenTrained()],
            )  # fmt: skip
        push_to_hub(fresh, fresh_repo, base_model=base_repo)
    with phase("unlearn one author on the Hub (replay)", task=forget) as record:
        with contextlib.redirect_stdout(io.StringIO()):
            report = unlearn_repo(
                repo, [forget], model=model, dataset=dataset, task_column="author",
                args=sift_config(profile, work_dir / "runs"), data_collator=collator, cache_dir=str(cache_dir),
                callbacks=[ScoreWhenTrained()],
            )  # fmt: skip
        reported = ("replay_steps", "bytes_uploaded", "uploaded", "deleted", "parent", "squashed", "refs_holding")
        record.update({name: getattr(report, name) for name in reported})

    published, reference = hub_tree(repo), hub_tree(fresh_repo)
    checks = {
        "files_of_a_fresh_push_plus_the_log": sorted(published) == sorted([*reference, LOG_NAME]),
        "weights_and_masks_equal": all(published.get(n) == oid for n, oid in reference.items() if n != "README.md"),
        "card_equal_up_to_the_log": card_head(repo, "main", cache_dir) == card_head(fresh_repo, "main", cache_dir),
        "commits_after_squash": len(api.list_repo_commits(repo)),
    }
    kept = remaining[-1]
    with phase("pull a remaining author from the new head", task=kept):
        served = MergedMaskedModel.from_pretrained(repo, task=kept, cache_dir=cache_dir)
    checks["remaining_author_served_as_the_fresh_merge"] = served_equal(
        served, MergedMaskedModel.from_pretrained(fresh, task=kept, base_model=base_dir)
    )
    try:
        MergedMaskedModel.from_pretrained(repo, task=forget, cache_dir=cache_dir)
        checks["forgotten_author_refused"] = False
    except UnknownTaskError as error:
        checks["forgotten_author_refused"] = type(error).__name__
    return {
        "schema": "hf_sift tofu publish v1 (docs/tofu.md)",
        "profile": profile.name,
        "artifact": str(artifact),
        "tasks": ids,
        "forgotten": forget,
        "machine": machine(),
        "phases": phases,
        "checks": checks,
    }


def table(payload: dict[str, Any]) -> str:
    lines = ["| phase | seconds | bytes uploaded | peak RSS (MiB) |", "|---|---|---|---|"]
    for name, record in payload["phases"].items():
        uploaded = record.get("bytes_uploaded")
        lines.append(
            f"| {name} | {record['seconds']} | {'' if uploaded is None else uploaded} | {record['peak_rss_mib']} |"
        )
    lines += ["", *(f"- {name}: {value}" for name, value in payload["checks"].items())]
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    from .profiles import PROFILES

    parser = argparse.ArgumentParser(prog="python -m benchmarks.tofu.publish", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu-steps")
    parser.add_argument("--forget", default=None, help="the author of the deletion request (default: the last one)")
    parser.add_argument("--data-dir", "--data_dir", type=Path, default=None)
    parser.add_argument("--work-dir", "--work_dir", type=Path, default=None, help="default outputs/tofu-<profile>")
    parser.add_argument(
        "--results", type=Path, default=None, help="default benchmarks/results/tofu-<profile>-publish.json"
    )
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    work_dir = args.work_dir or REPO / "outputs" / f"tofu-{profile.name}"
    results = args.results or REPO / "benchmarks" / "results" / f"tofu-{profile.name}-publish.json"
    if not (work_dir / "sift-merged" / "sift_manifest.json").is_file():
        print(
            f"publish: error: no SIFT artifact in {work_dir / 'sift-merged'}; run the profile first", file=sys.stderr
        )
        return 2
    from .data import default_data_dir

    data_dir = args.data_dir or default_data_dir()
    if not (data_dir / "full.json").is_file():
        print(f"publish: error: no TOFU data in {data_dir} (expected ../shared/data/tofu)", file=sys.stderr)
        return 2
    if "huggingface_hub" in sys.modules:
        print("publish: error: huggingface_hub was imported before the local Hub was set up", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="publish-", dir=work_dir) as tmp:
        # huggingface_hub reads these when it is imported: the client talks to the local server only.
        os.environ.update(
            HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HOME=str(Path(tmp) / "hf-home"),
        )  # fmt: skip
        import warnings

        from transformers.utils import logging as hf_logging

        from hf_sift.testing import HubServer

        from .report import write_json

        warnings.filterwarnings("ignore")
        hf_logging.set_verbosity_error()
        port = int(os.environ["HF_ENDPOINT"].rsplit(":", 1)[1])
        with HubServer(root=Path(tmp) / "hub", port=port):
            try:
                payload = publish_study(profile, data_dir, work_dir, Path(tmp) / "cache", args.forget)
            except ValueError as error:  # an author that is not merged; hf_sift's errors are ValueErrors too
                print(f"publish: error: {str(error).splitlines()[0]}", file=sys.stderr)
                return 2
    write_json(results, payload)
    print(f"\n{table(payload)}\n\nresults: {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

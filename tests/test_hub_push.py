"""Push and pull of SIFT artifacts against the local Hub, through the unmodified huggingface_hub client."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import perturbed, tiny_llama_config
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError
from transformers import LlamaForCausalLM

from hf_sift import MergedDelta, MergedMaskedModel, TaskVector
from hf_sift.cli import main
from hf_sift.digest import state_dict_digest
from hf_sift.errors import (
    BaseModelMismatchError,
    ConcurrentUpdateError,
    HubTransferError,
    MissingBaseModelError,
    OutputDirError,
    PathNotFoundError,
    UnknownTaskError,
)
from hf_sift.hub import pull_artifact, push_to_hub
from hf_sift.hub.model_card import build_model_card


SEED = 7
TASKS = ["t1", "t2", "t3", "t4", "t5"]
ARTIFACT_FILES = ["masks/t1.safetensors", "sift_config.json", "sift_delta.safetensors", "sift_manifest.json"]


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def repo_files(repo_id: str, cache_dir: Path, revision: str | None = None) -> dict[str, bytes]:
    api = HfApi()
    return {
        name: Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir)).read_bytes()
        for name in api.list_repo_files(repo_id, revision=revision)
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory, local_hub):
    """A tiny base model (also on the local Hub as me/tiny-base) and five fake fine-tunes of it."""
    folder = tmp_path_factory.mktemp("push")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    base_dir = folder / "base"
    model.save_pretrained(base_dir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    api = HfApi()
    api.create_repo("me/tiny-base", exist_ok=True)
    api.upload_folder(folder_path=base_dir, repo_id="me/tiny-base")
    vectors = {t: TaskVector.from_state_dicts(base, perturbed(base, 100 + i), SEED) for i, t in enumerate(TASKS)}
    return folder, base_dir, base, vectors


def build(world, name: str, tasks: list[str]) -> Path:
    folder, base_dir, base, vectors = world
    delta = MergedDelta(base, sign_seed=SEED, base_model=str(base_dir), base_model_digest=state_dict_digest(base))
    for task in tasks:
        delta.add(task, vectors[task])
    artifact = folder / name
    delta.save_pretrained(artifact)
    return artifact


def test_push_then_pull_one_task(world, hub, tmp_path):
    artifact = build(world, "five", TASKS)
    local = folder_files(artifact)
    result = push_to_hub(artifact, "me/five", base_model="me/tiny-base", license="apache-2.0")

    api = HfApi()
    assert api.model_info("me/five").sha == result.commit
    assert [c.title for c in api.list_repo_commits("me/five")] == ["hf_sift: push 5 merged task(s)", "initial commit"]
    assert len([r for r in hub.requests if r.route == "commit"]) == 1
    remote = repo_files("me/five", tmp_path / "cache")
    assert sorted(remote) == sorted([*local, "README.md", ".gitattributes"])
    for name, data in local.items():
        if name != "sift_config.json":
            assert remote[name] == data, name
    base_sha = api.model_info("me/tiny-base").sha
    assert (result.base_model, result.base_revision) == ("me/tiny-base", base_sha)
    pushed = MergedDelta.from_pretrained("me/five", cache_dir=tmp_path / "delta-cache")
    assert (pushed.base_model, pushed.base_revision) == ("me/tiny-base", base_sha)
    assert folder_files(artifact) == local  # the local artifact is only read

    card = ModelCard.load("me/five")
    assert card.data.base_model == "me/tiny-base"
    assert card.data.tags == ["hf-sift", "sift-masks", "merge", "unlearning"]
    assert card.data.license == "apache-2.0"
    assert "5 tasks are merged" in card.text and 'task="t1"' in card.text
    assert "carries no unlearning log" in card.text

    # One task from the Hub: only the config, manifest, plain merge P (format 2; with its generation config) and that
    # task's mask are fetched from the artifact repo, never the sum.
    hub.clear_requests()
    served = MergedMaskedModel.from_pretrained("me/five", task="t2", cache_dir=tmp_path / "serve-cache")
    fetched = {r.path.split("/resolve/")[1].split("/", 1)[1] for r in hub.requests if r.path.startswith("/me/five/")}
    assert fetched == {
        "sift_config.json",
        "sift_manifest.json",
        "model.safetensors",
        "generation_config.json",
        "masks/t2.safetensors",
    }
    _, base_dir, _, _ = world
    expected = MergedMaskedModel.from_pretrained(artifact, task="t2", base_model=base_dir)
    for name, tensor in expected.model.state_dict().items():
        assert torch.equal(served.model.state_dict()[name], tensor), name


def test_a_second_push_after_removing_a_task_is_one_commit_of_the_changes(world, hub, tmp_path):
    artifact = build(world, "before-removal", TASKS)
    first = push_to_hub(artifact, "me/removal", base_model="me/tiny-base")
    delta = MergedDelta.from_pretrained(artifact)
    delta.remove("t3", world[3]["t3"])
    delta.save_pretrained(artifact)

    hub.clear_requests()
    second = push_to_hub(artifact, "me/removal", base_model="me/tiny-base")
    assert second.parent == first.commit
    assert second.deleted == ["masks/t3.safetensors"]
    assert sorted(second.uploaded) == [  # format 2: P is rewritten too
        "README.md",
        "model.safetensors",
        "sift_config.json",
        "sift_delta.safetensors",
        "sift_manifest.json",
    ]
    oids = [
        hashlib.sha256((artifact / n).read_bytes()).hexdigest()
        for n in ("sift_delta.safetensors", "model.safetensors")
    ]
    uploads = [r.path for r in hub.requests if r.route == "lfs_upload"]
    assert sorted(uploads) == sorted(f"/lfs-upload/{oid}" for oid in oids)  # the sum and P
    assert [r.route for r in hub.requests].count("commit") == 1
    assert len(HfApi().list_repo_commits("me/removal")) == 3

    # The repo now holds what a fresh push of the four remaining tasks holds (the card names its own repo).
    push_to_hub(build(world, "four", ["t1", "t2", "t4", "t5"]), "me/four", base_model="me/tiny-base")
    removal, four = repo_files("me/removal", tmp_path / "c"), repo_files("me/four", tmp_path / "c")
    assert removal.pop("README.md").replace(b"removal", b"four") == four.pop("README.md")
    assert removal == four

    again = push_to_hub(artifact, "me/removal", base_model="me/tiny-base")
    assert (again.commit, again.uploaded, again.deleted) == (second.commit, [], [])


def test_a_push_from_a_stale_revision_is_refused_and_changes_nothing(world, hub):
    artifact = build(world, "stale", TASKS[:2])
    api = HfApi()
    api.create_repo("me/stale")
    start = api.model_info("me/stale").sha
    other = api.upload_file(path_or_fileobj=b"notes", path_in_repo="notes.txt", repo_id="me/stale")
    with pytest.raises(ConcurrentUpdateError, match="changed since this push started"):
        push_to_hub(artifact, "me/stale", base_model="me/tiny-base", parent_commit=start)
    assert api.model_info("me/stale").sha == other.oid
    assert api.list_repo_files("me/stale") == [".gitattributes", "notes.txt"]
    retry = push_to_hub(artifact, "me/stale", base_model="me/tiny-base")
    assert retry.parent == other.oid
    assert "notes.txt" in api.list_repo_files("me/stale")  # files that are not the artifact's are kept


def test_a_dropped_commit_leaves_repo_and_folder_intact_and_a_retry_succeeds(world, hub):
    artifact = build(world, "drop-commit", TASKS[:2])
    local = folder_files(artifact)
    api = HfApi()
    api.create_repo("me/push-drop-commit")
    head = api.model_info("me/push-drop-commit").sha
    hub.drop("commit")
    with pytest.raises(HubTransferError, match="did not complete"):
        push_to_hub(artifact, "me/push-drop-commit", base_model="me/tiny-base")
    assert api.model_info("me/push-drop-commit").sha == head
    assert folder_files(artifact) == local
    result = push_to_hub(artifact, "me/push-drop-commit", base_model="me/tiny-base")
    assert result.parent == head and api.model_info("me/push-drop-commit").sha == result.commit


def test_a_dropped_lfs_upload_leaves_repo_and_folder_intact_and_a_retry_succeeds(world, hub):
    artifact = build(world, "drop-lfs", ["t3", "t5"])  # a sum no other test pushes: the Hub does not have it yet
    local = folder_files(artifact)
    api = HfApi()
    api.create_repo("me/push-drop-lfs")
    head = api.model_info("me/push-drop-lfs").sha
    # The client retries an LFS upload 5 times (waiting 1+2+4+8+8 s): drop all six attempts to upload the sum.
    sum_oid = hashlib.sha256((artifact / "sift_delta.safetensors").read_bytes()).hexdigest()
    assert not hub.store.blobs.has(sum_oid)
    hub.drop("lfs_upload", times=6, path_contains=sum_oid)
    with pytest.raises(HubTransferError, match="did not complete") as failed:
        push_to_hub(artifact, "me/push-drop-lfs", base_model="me/tiny-base")
    assert "Error while uploading 'sift_delta.safetensors'" in str(failed.value.__cause__)
    assert [r.status for r in hub.requests if r.route == "lfs_upload" and sum_oid in r.path] == [None] * 6
    assert [r for r in hub.requests if r.route == "commit"] == []
    assert api.model_info("me/push-drop-lfs").sha == head
    assert folder_files(artifact) == local
    result = push_to_hub(artifact, "me/push-drop-lfs", base_model="me/tiny-base")
    assert api.model_info("me/push-drop-lfs").sha == result.commit


def test_the_base_model_must_be_named_on_the_hub_and_match(world, hub, tmp_path):
    artifact = build(world, "base-check", TASKS[:1])
    api = HfApi()
    with pytest.raises(MissingBaseModelError, match="--base-model"):
        push_to_hub(artifact, "me/base-check")
    with pytest.raises(PathNotFoundError, match="no such folder"):
        push_to_hub(tmp_path / "missing" / "artifact", "me/base-check", base_model="me/tiny-base")
    assert not (tmp_path / "missing").exists()
    torch.manual_seed(1)
    other = tmp_path / "other"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(other)
    api.create_repo("me/other-base")
    api.upload_folder(folder_path=other, repo_id="me/other-base")
    with pytest.raises(BaseModelMismatchError):
        push_to_hub(artifact, "me/base-check", base_model="me/other-base")
    with pytest.raises(MissingBaseModelError, match="not on the Hub"):
        push_to_hub(artifact, "me/base-check", base_model="me/no-such-base")
    with pytest.raises(RepositoryNotFoundError):  # a refused push creates nothing
        api.model_info("me/base-check")


def test_merged_delta_push_and_load_by_repo_id(world, hub, tmp_path):
    _, _, base, vectors = world
    delta = MergedDelta(base, sign_seed=SEED, base_model="me/tiny-base", base_model_digest=state_dict_digest(base))
    for task in TASKS[:3]:
        delta.add(task, vectors[task])
    first = delta.push_to_hub("me/in-memory")
    # A base recorded as a Hub id is pinned to the commit it resolved to.
    assert (first.base_model, first.base_revision) == ("me/tiny-base", HfApi().model_info("me/tiny-base").sha)
    before = delta.digest
    delta.remove("t2", vectors["t2"])
    delta.log.append("t2", digest_before=before, digest_after=delta.digest, cost={"steps": 3})
    second = delta.push_to_hub("me/in-memory")
    assert "sift_unlearning_log.jsonl" in second.uploaded and second.deleted == ["masks/t2.safetensors"]
    card = ModelCard.load("me/in-memory")
    assert "1 task was removed" in card.text and f"removed task `t2`; sum `{before}` → `{delta.digest}`" in card.text

    loaded = MergedDelta.from_pretrained("me/in-memory", cache_dir=tmp_path)
    assert loaded.task_ids == ["t1", "t3"] and loaded.digest == delta.digest
    assert loaded.log.entries == delta.log.entries  # the log comes with the delta, so a later save keeps it
    old = MergedDelta.from_pretrained("me/in-memory", revision=first.commit, cache_dir=tmp_path)
    assert old.task_ids == ["t1", "t2", "t3"]
    expected = MergedDelta.from_pretrained(build(world, "t123", TASKS[:3])).load_mask("t2")
    for name, tensor in old.load_mask("t2").items():
        assert torch.equal(tensor, expected[name]), name
    hub.clear_requests()
    offline = MergedDelta.from_pretrained("me/in-memory", cache_dir=tmp_path, local_files_only=True)
    assert offline.digest == delta.digest and hub.requests == []


def test_cli_push_and_pull(world, hub, tmp_path, capsys):
    artifact = build(world, "cli", TASKS[:2])
    assert main(["push", str(artifact), "me/cli"]) == 2
    assert "--base-model" in capsys.readouterr().err
    assert main(["push", str(artifact), "me/cli", "--base-model", "me/tiny-base"]) == 0
    assert "pushed" in capsys.readouterr().out

    cache = str(tmp_path / "cache")
    out = tmp_path / "one-task"
    assert main(["pull", "me/cli", "--task", "t1", "-o", str(out), "--cache-dir", cache]) == 0
    local = folder_files(artifact)
    # Every file but the other task's mask (format 2: the plain merge P and its configs too).
    kept = [name for name in local if name != "masks/t2.safetensors"]
    assert {"model.safetensors", "config.json", *ARTIFACT_FILES} <= set(kept)
    assert folder_files(out) == {name: local[name] for name in kept if name != "sift_config.json"} | {
        "sift_config.json": folder_files(out)["sift_config.json"]
    }
    assert main(["pull", "me/cli", "--task", "t1", "-o", str(out), "--cache-dir", cache]) == 2
    assert "not empty" in capsys.readouterr().err
    hub.drop("commit")
    assert main(["push", str(build(world, "cli-more", TASKS[:3])), "me/cli", "--base-model", "me/tiny-base"]) == 1
    assert "hf-sift: error: the push to me/cli@main did not complete" in capsys.readouterr().err

    whole = pull_artifact("me/cli", tmp_path / "whole", cache_dir=cache)
    assert sorted(folder_files(whole)) == sorted([*local, "README.md"])
    with pytest.raises(UnknownTaskError):
        pull_artifact("me/cli", tmp_path / "none", task="t9", cache_dir=cache)
    assert not (tmp_path / "none").exists()
    with pytest.raises(OutputDirError):
        pull_artifact("me/cli", whole, cache_dir=cache)
    assert main(["pull", "me/cli", "--task", "t2", "-o", str(out), "--cache-dir", cache, "--overwrite"]) == 0
    assert sorted(folder_files(out)) == sorted(n.replace("t1", "t2") for n in kept)


def test_model_card_lists_tasks_datasets_and_the_unlearning_log():
    records = {f"t{i}": {"metadata": {"dataset": f"org/data-{i % 2}"}} for i in range(60)}
    redacted = {"time": "2026-01-02T03:04:05.000000Z", "task_hash": "x", "digest_before": "a", "digest_after": "b"}
    text = build_model_card("me/big", "org/base", "a" * 40, records, unlearning_log=[redacted])
    card = ModelCard(text)
    assert card.data.datasets == ["org/data-0", "org/data-1"]
    assert "60 tasks are merged" in card.text and "and 10 more" in card.text
    assert "- 2026-01-02T03:04:05.000000Z: removed a task (its id is recorded only as a salted hash)" in card.text
    assert build_model_card("me/big", "org/base", None, records) == build_model_card(
        "me/big", "org/base", None, records
    )


def test_a_delta_loaded_from_the_hub_saves_to_a_folder_of_its_own(world, hub, tmp_path):
    """Its masks are files of the Hugging Face cache, relative links into the cache's blobs: the save copies them
    through the links (a link would dangle in the new folder, and a hard link to a blob would share it)."""
    artifact = build(world, "to-save", TASKS[:3])
    push_to_hub(artifact, "me/to-save", base_model="me/tiny-base")
    loaded = MergedDelta.from_pretrained("me/to-save", cache_dir=tmp_path / "cache")
    loaded.save_pretrained(tmp_path / "mine")
    masks = sorted((tmp_path / "mine" / "masks").iterdir())
    assert [m.name for m in masks] == ["t1.safetensors", "t2.safetensors", "t3.safetensors"]
    for mask in masks:
        assert not mask.is_symlink() and mask.stat().st_nlink == 1
        assert mask.read_bytes() == (artifact / "masks" / mask.name).read_bytes()
    again = MergedDelta.from_pretrained(tmp_path / "mine")
    assert again.task_ids == loaded.task_ids and again.digest == loaded.digest

"""A push that meets a dropped connection or a slow Hub, against the local Hub's fault injection.

The client's own retries are accounted for: `huggingface_hub` sends an LFS upload up to six times (`http_backoff`,
5 retries on network errors), and the commit POST once (`_send_commit` without `retry_on_error`). The request log
shows every attempt, so a retry that landed cannot pass for a failure, nor the reverse.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import perturbed, tiny_llama_config
from huggingface_hub import HfApi, RepoFile, snapshot_download
from transformers import LlamaForCausalLM

from hf_sift import MergedDelta, TaskVector
from hf_sift.digest import state_dict_digest
from hf_sift.errors import HubTransferError
from hf_sift.hub import push_to_hub


SEED = 7
BASE = "me/faults-base"


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (through the cache's symlinks), by relative path."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def repo_state(repo_id: str) -> tuple[str, dict[str, tuple[int, str]]]:
    """The branch head and every file of the repo there, with its size and content hash."""
    api = HfApi()
    head = api.model_info(repo_id).sha
    files = {
        e.path: (e.size, e.lfs.sha256 if e.lfs else e.blob_id)
        for e in api.list_repo_tree(repo_id, revision=head, recursive=True)
        if isinstance(e, RepoFile)
    }
    return head, files


@pytest.fixture(scope="module")
def build(tmp_path_factory, local_hub):
    """Build an artifact of some of four tasks over a tiny base that is on the local Hub as BASE."""
    root = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(root / "base")
    base = LlamaForCausalLM.from_pretrained(root / "base").state_dict()
    HfApi().create_repo(BASE, exist_ok=True)
    HfApi().upload_folder(folder_path=root / "base", repo_id=BASE)
    vectors = {f"t{i}": TaskVector.from_state_dicts(base, perturbed(base, 300 + i), SEED) for i in range(4)}

    def artifact(name: str, tasks: list[str]) -> Path:
        delta = MergedDelta(
            base, sign_seed=SEED, base_model=str(root / "base"), base_model_digest=state_dict_digest(base)
        )
        for task in tasks:
            delta.add(task, vectors[task])
        delta.save_pretrained(root / name)
        return root / name

    return artifact


@pytest.mark.parametrize("where", ["lfs_upload", "commit"])
def test_a_dropped_connection_leaves_repo_folder_and_cache_as_they_were(build, hub, tmp_path, where):
    repo = f"me/faults-drop-{where.replace('_', '-')}"
    push_to_hub(build(f"{where}-v1", ["t0", "t1"]), repo, base_model=BASE)
    before = repo_state(repo)
    cache = tmp_path / "cache"
    snapshot = Path(snapshot_download(repo, cache_dir=cache))  # a user's download of the current revision
    cached = digests(cache)
    artifact = build(f"{where}-v2", ["t0", "t1", {"lfs_upload": "t2", "commit": "t3"}[where]])  # a sum new to the Hub
    local = digests(artifact)
    sum_oid = local["sift_delta.safetensors"]
    hub.clear_requests()
    if where == "lfs_upload":  # every attempt of the client (1 + 5 retries) to upload the new sum
        hub.drop("lfs_upload", times=6, path_contains=sum_oid)
    else:
        hub.drop("commit")

    with pytest.raises(HubTransferError, match=f"the push to {repo}@main did not complete") as failed:
        push_to_hub(artifact, repo, base_model=BASE)
    assert "pushing again uploads only what the repo lacks" in str(failed.value)
    attempts = [r for r in hub.requests if r.route == where]
    if where == "lfs_upload":
        assert [r.status for r in attempts if sum_oid in r.path] == [None] * 6
        assert [r for r in hub.requests if r.route == "commit"] == []
    else:
        assert [r.status for r in attempts] == [None]  # sent once: the client does not retry a commit
    assert repo_state(repo) == before  # same head, same files
    assert digests(artifact) == local  # the local artifact, byte for byte
    assert digests(cache) == cached  # the download cache
    assert Path(snapshot_download(repo, cache_dir=cache, local_files_only=True)) == snapshot

    retry = push_to_hub(artifact, repo, base_model=BASE)
    head, files = repo_state(repo)
    assert retry.parent == before[0] and head == retry.commit != before[0]
    assert files["sift_delta.safetensors"][1] == sum_oid
    assert Path(snapshot_download(repo, cache_dir=cache)).name == retry.commit


def test_slow_answers_do_not_break_a_push(build, hub):
    repo = "me/faults-delay"
    artifact = build("delay", ["t1", "t2"])
    HfApi().create_repo(repo)
    for route in ("preupload", "lfs_batch", "lfs_upload", "commit"):
        hub.delay(route, seconds=1.0)
    result = push_to_hub(artifact, repo, base_model=BASE)
    assert HfApi().model_info(repo).sha == result.commit
    # Each slow request was answered once, and not sent again by a client retry.
    statuses = {route: [r.status for r in hub.requests if r.route == route] for route in ("commit", "lfs_batch")}
    assert statuses == {"commit": [200], "lfs_batch": [200]}
    uploads = [r for r in hub.requests if r.route == "lfs_upload"]
    assert len(uploads) == len({r.path for r in uploads}) and all(r.status == 200 for r in uploads)
    assert repo_state(repo)[1]["sift_delta.safetensors"][1] == digests(artifact)["sift_delta.safetensors"]


def test_a_commit_whose_answer_is_lost_has_landed_whole_and_pushing_again_adds_nothing(build, hub):
    repo = "me/faults-lost-answer"
    push_to_hub(build("lost-v1", ["t0"]), repo, base_model=BASE)
    before = repo_state(repo)
    artifact = build("lost-v2", ["t0", "t2", "t3"])
    hub.clear_requests()
    hub.lose_answer("commit")
    with pytest.raises(HubTransferError, match="did not complete"):
        push_to_hub(artifact, repo, base_model=BASE)
    assert [r.status for r in hub.requests if r.route == "commit"] == [None]
    head, files = repo_state(repo)
    assert head != before[0] and files["masks/t3.safetensors"][1] == digests(artifact)["masks/t3.safetensors"]
    # Pushing again finds every file in place: no second commit, nothing uploaded.
    again = push_to_hub(artifact, repo, base_model=BASE)
    assert (again.parent, again.commit, again.uploaded, again.deleted) == (head, head, [], [])
    assert [c.title for c in HfApi().list_repo_commits(repo)][:2] == [
        "hf_sift: push 3 merged task(s)",
        "hf_sift: push 1 merged task(s)",
    ]

"""The local Hub, driven only through the unmodified `huggingface_hub` client (HF_ENDPOINT set in conftest.py)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hf_sift.errors import HubServerError
from hf_sift.testing.hub_server import HubServer


def _routes(hub: HubServer, *routes: str) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in hub.requests if r.route in routes]


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    return HfApi(token=False)


def test_client_reads_the_local_endpoint(hub):
    assert hub.endpoint == constants.ENDPOINT
    assert constants.HF_HUB_DISABLE_XET


def test_history_refs_and_downloads(hub, api, tmp_path):
    weights, text = os.urandom(4096), b"hello"
    api.create_repo("me/history")
    first = api.create_commit(
        "me/history",
        [CommitOperationAdd("model.safetensors", weights), CommitOperationAdd("docs/a.txt", text)],
        commit_message="first",
    )
    assert _routes(hub, "lfs_upload") == [("PUT", f"/lfs-upload/{hashlib.sha256(weights).hexdigest()}")]
    api.create_tag("me/history", tag="v1")
    second = api.create_commit(
        "me/history",
        [CommitOperationAdd("b.txt", b"b"), CommitOperationDelete("docs/")],
        commit_message="second",
        parent_commit=first.oid,
    )

    assert api.list_repo_files("me/history") == [".gitattributes", "b.txt", "model.safetensors"]
    assert api.list_repo_files("me/history", revision="v1") == [".gitattributes", "docs/a.txt", "model.safetensors"]
    assert [c.title for c in api.list_repo_commits("me/history")] == ["second", "first", "initial commit"]
    info = api.model_info("me/history", files_metadata=True)
    assert info.sha == second.oid
    lfs = {s.rfilename: s.lfs for s in info.siblings}
    assert lfs["model.safetensors"].sha256 == hashlib.sha256(weights).hexdigest()
    assert lfs["b.txt"] is None
    assert api.model_info("me/history", revision="v1").sha == first.oid
    tree = {f.path: f for f in api.list_repo_tree("me/history", recursive=True, revision=first.oid)}
    assert sorted(tree) == [".gitattributes", "docs", "docs/a.txt", "model.safetensors"]
    assert tree["model.safetensors"].size == len(weights)
    paths = api.get_paths_info("me/history", ["model.safetensors", "missing.txt"], revision="v1")
    assert [(p.path, p.lfs.sha256) for p in paths] == [("model.safetensors", hashlib.sha256(weights).hexdigest())]
    refs = api.list_repo_refs("me/history")
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", second.oid)]
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", first.oid)]

    hub.clear_requests()
    path = hf_hub_download("me/history", "model.safetensors", cache_dir=tmp_path)
    assert Path(path).read_bytes() == weights
    assert Path(path).parent.name == second.oid  # X-Repo-Commit names the snapshot
    # The LFS file is a redirect to the storage host, as on the Hub.
    # (The client's own look-ups outside the Hub API, such as its agent registry, are routed "unknown".)
    assert [(r.route, r.status) for r in hub.requests if r.route != "unknown"] == [
        ("resolve", 302),
        ("lfs_download", 200),
    ]
    old = hf_hub_download("me/history", "docs/a.txt", revision="v1", cache_dir=tmp_path)
    assert Path(old).read_bytes() == text

    api.super_squash_history("me/history")
    assert [c.title for c in api.list_repo_commits("me/history")] == [
        "Super-squash branch 'main' using huggingface_hub"
    ]
    assert api.list_repo_files("me/history") == [".gitattributes", "b.txt", "model.safetensors"]
    assert api.list_repo_refs("me/history").tags[0].target_commit == first.oid  # tags keep their history
    with pytest.raises(RevisionNotFoundError):
        api.model_info("me/history", revision=second.oid)  # no ref reaches it any more

    api.delete_repo("me/history")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("me/history")


def test_errors_carry_the_hub_error_codes(hub, api, tmp_path):
    api.create_repo("me/errors")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("me/none", "x.txt", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("me/errors", ".gitattributes", revision="nope", cache_dir=tmp_path)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("me/errors", "missing.txt", cache_dir=tmp_path)
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("me/errors")
    assert conflict.value.response.status_code == 409
    api.create_repo("me/errors", exist_ok=True)
    with pytest.raises(HubServerError):
        hub.drop("no-such-route")


def test_readme_metadata_is_validated(hub, api):
    api.create_repo("me/yaml")
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.upload_file(
            path_or_fileobj=b"---\n- a list, not a mapping\n---\n", path_in_repo="README.md", repo_id="me/yaml"
        )
    assert api.list_repo_files("me/yaml") == [".gitattributes"]
    api.upload_file(path_or_fileobj=b"---\nlicense: mit\n---\n# card\n", path_in_repo="README.md", repo_id="me/yaml")
    assert [r.status for r in hub.requests if r.route == "validate_yaml"] == [400, 200]


def test_parent_commit_not_at_head_is_refused_with_412(hub, api):
    api.create_repo("me/race")
    start = api.model_info("me/race").sha
    winner = api.upload_file(path_or_fileobj=b"1", path_in_repo="a.txt", repo_id="me/race")
    with pytest.raises(HfHubHTTPError) as refused:
        api.create_commit("me/race", [CommitOperationAdd("b.txt", b"2")], commit_message="late", parent_commit=start)
    assert refused.value.response.status_code == 412
    assert api.model_info("me/race").sha == winner.oid
    assert api.list_repo_files("me/race") == [".gitattributes", "a.txt"]


def test_preupload_deduplicates_unchanged_files(hub, api):
    weights = os.urandom(2048)
    api.create_repo("me/dedup")
    api.create_commit("me/dedup", [CommitOperationAdd("w.safetensors", weights)], commit_message="w")
    hub.clear_requests()
    # The same LFS content under another name is already stored: no upload, only the commit.
    api.create_commit("me/dedup", [CommitOperationAdd("copy.safetensors", weights)], commit_message="copy")
    assert _routes(hub, "lfs_upload") == []
    assert len(_routes(hub, "commit")) == 1
    hub.clear_requests()
    # Unchanged files are dropped by the client after preupload: no commit at all.
    head = api.model_info("me/dedup").sha
    api.create_commit("me/dedup", [CommitOperationAdd("w.safetensors", weights)], commit_message="same")
    assert _routes(hub, "commit", "lfs_upload") == []
    assert api.model_info("me/dedup").sha == head


def test_snapshot_download_fetches_only_allowed_files(hub, api, tmp_path):
    api.create_repo("me/snap")
    api.create_commit(
        "me/snap",
        [CommitOperationAdd(f"masks/{i}.safetensors", os.urandom(64)) for i in range(3)]
        + [CommitOperationAdd("config.json", b"{}")],
        commit_message="files",
    )
    hub.clear_requests()
    folder = snapshot_download("me/snap", allow_patterns=["config.json", "masks/1.safetensors"], cache_dir=tmp_path)
    assert sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()) == [
        "config.json",
        "masks/1.safetensors",
    ]
    resolved = {r.path.split("/resolve/")[1].split("/", 1)[1] for r in hub.requests if r.route == "resolve"}
    assert resolved == {"config.json", "masks/1.safetensors"}


def test_a_dropped_commit_leaves_the_repo_unchanged_and_a_retry_lands(hub, api):
    api.create_repo("me/drop-commit")
    head = api.model_info("me/drop-commit").sha
    hub.drop("commit")
    with pytest.raises(httpx2.TransportError):
        api.create_commit(
            "me/drop-commit", [CommitOperationAdd("a.txt", b"a")], commit_message="a", parent_commit=head
        )
    assert [r.status for r in hub.requests if r.route == "commit"] == [None]
    assert api.model_info("me/drop-commit").sha == head
    retry = api.create_commit(
        "me/drop-commit", [CommitOperationAdd("a.txt", b"a")], commit_message="a", parent_commit=head
    )
    assert api.model_info("me/drop-commit").sha == retry.oid
    assert [c.title for c in api.list_repo_commits("me/drop-commit")] == ["a", "initial commit"]


def test_a_dropped_lfs_upload_stores_nothing_and_the_client_retry_completes_it(hub, api):
    weights = os.urandom(1 << 16)
    oid = hashlib.sha256(weights).hexdigest()
    api.create_repo("me/drop-lfs")
    hub.drop("lfs_upload")
    api.create_commit("me/drop-lfs", [CommitOperationAdd("w.safetensors", weights)], commit_message="w")
    # The client's own backoff sent the upload again after the dropped one.
    assert [r.status for r in hub.requests if r.route == "lfs_upload"] == [None, 200]
    assert sorted(p.name for p in hub.store.blobs.folder.iterdir() if p.name == oid) == [oid]
    assert not [p for p in hub.store.blobs.folder.iterdir() if p.name.startswith(".incoming-")]
    assert [c.title for c in api.list_repo_commits("me/drop-lfs")] == ["w", "initial commit"]


def test_delayed_answers_arrive(hub, api):
    api.create_repo("me/delay")
    hub.delay("repo_info", seconds=0.5)
    started = time.perf_counter()
    assert api.model_info("me/delay").id == "me/delay"
    assert time.perf_counter() - started >= 0.5


def test_branches_and_tags_are_created_and_deleted(hub, api):
    api.create_repo("me/refs")
    start = api.model_info("me/refs").sha
    api.create_branch("me/refs", branch="dev")
    on_dev = api.upload_file(path_or_fileobj=b"d", path_in_repo="d.txt", repo_id="me/refs", revision="dev")
    api.create_tag("me/refs", tag="dev-1", revision="dev")
    refs = api.list_repo_refs("me/refs")
    assert sorted((b.name, b.target_commit) for b in refs.branches) == [("dev", on_dev.oid), ("main", start)]
    assert [(t.name, t.target_commit) for t in refs.tags] == [("dev-1", on_dev.oid)]
    with pytest.raises(HfHubHTTPError) as exists:
        api.create_branch("me/refs", branch="dev")
    assert exists.value.response.status_code == 409
    api.delete_branch("me/refs", branch="dev")
    assert api.list_repo_files("me/refs", revision="dev-1") == [".gitattributes", "d.txt"]  # the tag keeps it
    api.delete_tag("me/refs", tag="dev-1")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("me/refs", revision=on_dev.oid)  # no ref reaches it any more
    with pytest.raises(RevisionNotFoundError):
        api.delete_tag("me/refs", tag="dev-1")


def test_a_pull_request_is_a_ref_of_its_own(hub, api):
    api.create_repo("me/prs")
    start = api.model_info("me/prs").sha
    first = api.create_commit(
        "me/prs", [CommitOperationAdd("p.txt", b"p")], commit_message="proposal", create_pr=True, parent_commit=start
    )
    second = api.create_commit("me/prs", [CommitOperationAdd("q.txt", b"q")], commit_message="other", create_pr=True)
    assert (first.pr_revision, first.pr_num, second.pr_revision) == ("refs/pr/1", 1, "refs/pr/2")
    assert api.model_info("me/prs").sha == start  # main is unchanged
    assert api.list_repo_files("me/prs", revision="refs/pr/1") == [".gitattributes", "p.txt"]
    refs = api.list_repo_refs("me/prs", include_pull_requests=True)
    assert [(r.ref, r.target_commit) for r in refs.pull_requests] == [
        ("refs/pr/1", first.oid),
        ("refs/pr/2", second.oid),
    ]
    assert [b.name for b in refs.branches] == ["main"]
    assert api.list_repo_refs("me/prs").pull_requests is None


def test_request_bodies_are_bounded(hub, api):
    api.create_repo("me/bounded")
    hub.max_request_bytes = 4096
    try:
        with pytest.raises(HfHubHTTPError) as too_large:
            api.upload_file(path_or_fileobj=b"x" * 8192, path_in_repo="big.txt", repo_id="me/bounded")
    finally:
        hub.max_request_bytes = 256 << 20
    assert too_large.value.response.status_code == 413
    assert api.list_repo_files("me/bounded") == [".gitattributes"]


def test_connections_are_bounded():
    with HubServer(max_connections=1) as server:
        idle = socket.create_connection(("127.0.0.1", server.port))  # holds the only slot, sends nothing
        done = threading.Event()
        worker = threading.Thread(target=lambda: (HfApi(endpoint=server.endpoint).create_repo("me/wait"), done.set()))
        worker.start()
        assert not done.wait(0.5)  # not served while the slot is taken
        idle.close()
        worker.join(timeout=30)
        assert done.is_set()
        assert [r.route for r in server.requests] == ["create_repo"]


def test_tree_listing_is_paged(hub, api):
    api.create_repo("me/pages")
    api.create_commit(
        "me/pages", [CommitOperationAdd(f"f{i}.txt", b"%d" % i) for i in range(5)], commit_message="five"
    )
    hub.page_size = 2
    try:
        hub.clear_requests()
        assert api.list_repo_files("me/pages") == [".gitattributes"] + [f"f{i}.txt" for i in range(5)]
    finally:
        hub.page_size = 1000
    assert len(_routes(hub, "tree")) == 3


def test_shell_server_keeps_repos_in_its_root(tmp_path):
    def serve() -> tuple[subprocess.Popen, str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "hf_sift.testing.hub_server", "--port", "0", "--root", str(tmp_path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = process.stdout.readline()
        return process, line.split("local Hub at ")[1].split()[0]

    process, endpoint = serve()
    try:
        HfApi(endpoint=endpoint, token=False).create_repo("me/kept")
    finally:
        process.terminate()
        process.wait(timeout=30)
    process, endpoint = serve()
    try:
        assert HfApi(endpoint=endpoint, token=False).list_repo_files("me/kept") == [".gitattributes"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_refuses_non_loopback_addresses():
    with pytest.raises(HubServerError):
        HubServer(host="0.0.0.0")

"""`hf-sift verify` / `hf-sift info` and `verify_artifact` on a Hub repo id, against the local Hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import perturbed, tiny_llama_config
from huggingface_hub import CommitOperationAdd, HfApi
from transformers import LlamaForCausalLM

from hf_sift import MergedDelta, TaskVector, verify_artifact
from hf_sift.cli import main
from hf_sift.digest import state_dict_digest
from hf_sift.hub import push_to_hub
from hf_sift.inspect_cli import artifact_info


SEED = 7
REPO = "me/inspect"


def resolved(hub) -> set[str]:
    """The files of REPO that were downloaded (resolve requests), by path in the repo."""
    prefix = f"/{REPO}/resolve/"
    return {r.path[len(prefix) :].split("/", 1)[1] for r in hub.requests if r.path.startswith(prefix)}


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, local_hub):
    """A three-task format-2 artifact pushed to REPO (base on the local Hub too): (folder, commit)."""
    folder = tmp_path_factory.mktemp("inspect")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.save_pretrained(folder / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    api = HfApi()
    api.create_repo("me/inspect-base", exist_ok=True)
    api.upload_folder(folder_path=folder / "base", repo_id="me/inspect-base")
    delta = MergedDelta(
        base, sign_seed=SEED, base_model=str(folder / "base"), base_model_digest=state_dict_digest(base)
    )
    for i, task in enumerate(["t1", "t2", "t3"]):
        delta.add(task, TaskVector.from_state_dicts(base, perturbed(base, 200 + i), SEED))
    delta.save_pretrained(folder / "artifact")
    result = push_to_hub(folder / "artifact", REPO, base_model="me/inspect-base")
    return folder / "artifact", result.commit


def tamper(name: str, cache: str) -> str:
    """Commit `name` of REPO's head with its last byte flipped (a file changed on the Hub); returns the commit."""
    api = HfApi()
    data = bytearray(Path(api.hf_hub_download(REPO, name, cache_dir=cache)).read_bytes())
    data[-1] ^= 0x01
    return api.create_commit(REPO, [CommitOperationAdd(name, bytes(data))], commit_message=f"flip {name}").oid


def test_verify_a_repo_id_at_one_commit_then_a_tampered_file_fails(pushed, hub, tmp_path, capsys):
    artifact, good = pushed
    cache = str(tmp_path / "cache")
    assert main(["verify", REPO, "--cache-dir", cache]) == 0
    assert capsys.readouterr().out == f"{REPO}@{good}: every check holds\n"
    # What the checks read, into the normal cache at that commit: the plain merge P (with its config) included.
    assert resolved(hub) == {
        "sift_config.json",
        "sift_manifest.json",
        "sift_delta.safetensors",
        "config.json",
        "model.safetensors",
    } | {f"masks/t{i}.safetensors" for i in (1, 2, 3)}
    assert (Path(cache) / "models--me--inspect" / "snapshots" / good / "masks" / "t2.safetensors").is_file()

    bad_mask = tamper("masks/t2.safetensors", cache)
    assert main(["verify", REPO, "--cache-dir", cache]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{REPO}@{bad_mask}: 1 check(s) failed:",
        "  - masks/t2.safetensors: does not match the mask_digest recorded in sift_manifest.json",
    ]
    problems = verify_artifact(REPO, cache_dir=cache)
    assert problems == ["masks/t2.safetensors: does not match the mask_digest recorded in sift_manifest.json"]

    bad_sum = tamper("sift_delta.safetensors", cache)
    assert main(["verify", REPO, "--cache-dir", cache]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{REPO}@{bad_sum}: 2 check(s) failed:\n")
    assert "  - sift_delta.safetensors: the sum's digest " in out and "masks/t2.safetensors: does not match" in out

    # A pinned revision is checked as it was; offline, from the cache alone.
    assert verify_artifact(REPO, revision=good, cache_dir=cache) == []
    hub.clear_requests()
    assert main(["verify", REPO, "--revision", good, "--cache-dir", cache, "--local-files-only"]) == 0
    assert hub.requests == []
    assert main(["verify", REPO, "--revision", bad_mask, "--cache-dir", cache, "--local-files-only"]) == 1
    assert capsys.readouterr().out.startswith(f"{REPO}@{good}: every check holds\n{REPO}@{bad_mask}: 1 check(s)")
    assert verify_artifact(artifact) == []  # the local folder was never touched


def test_info_of_a_repo_id_reads_no_weights(pushed, hub, tmp_path, capsys):
    artifact, commit = pushed
    cache = str(tmp_path / "cache")
    assert main(["info", REPO, "--revision", commit, "--cache-dir", cache, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert resolved(hub) == {"sift_config.json", "sift_manifest.json"}
    local = artifact_info(artifact)
    assert (info["artifact"], info["repo_id"], info["revision"]) == (REPO, REPO, commit)
    assert info["tasks"] == ["t1", "t2", "t3"] and info["delta_digest"] == local["delta_digest"]
    assert info["base_model"] == "me/inspect-base"  # as pushed; the local folder records its path
    assert info["base_revision"] == HfApi().model_info("me/inspect-base").sha
    sizes = {p.relative_to(artifact).as_posix(): p.stat().st_size for p in artifact.rglob("*") if p.is_file()}
    assert info["sizes"]["masks"] == sum(n for name, n in sizes.items() if name.startswith("masks/"))
    assert info["sizes"]["sum"] == sizes["sift_delta.safetensors"]
    assert (
        info["sizes"]["plain"] == sizes["model.safetensors"] + sizes["config.json"] + sizes["generation_config.json"]
    )
    assert {k: v for k, v in local["sizes"].items() if k not in ("config_and_manifest", "total")} == {
        k: v for k, v in info["sizes"].items() if k not in ("config_and_manifest", "total")
    }

    hub.clear_requests()
    assert main(["info", REPO, "--revision", commit, "--cache-dir", cache, "--local-files-only"]) == 0
    text = capsys.readouterr().out
    assert hub.requests == []
    assert f"artifact:        {REPO}@{commit} (format 2" in text and "tasks T:         3 (t1, t2, t3)" in text
    assert "size:            unknown (offline" in text
    offline = artifact_info(REPO, revision=commit, cache_dir=cache, local_files_only=True)
    assert offline["sizes"] is None and offline["delta_digest"] == local["delta_digest"]


def test_a_name_that_is_neither_a_folder_nor_a_repo_exits_2(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in ("verify", "info"):
        assert main([command, "me/no-such-repo"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("hf-sift: error: the artifact 'me/no-such-repo': no such folder here, and not found")
        assert main([command, "./no-such-folder"]) == 2
        assert capsys.readouterr().err == "hf-sift: error: ./no-such-folder is not a folder\n"
        (tmp_path / "me" / "folder").mkdir(parents=True, exist_ok=True)  # a folder named like a repo id is a folder
        assert main([command, "me/folder", "--revision", "v1"]) == 2
        assert capsys.readouterr().err == (
            "hf-sift: error: me/folder is a local folder: --revision, --cache-dir, --local-files-only and --token "
            "apply to a Hub repo id only\n"
        )

"""Acceptance against the local Hub: five tiny tasks trained with `train_tasks` from a Hub base, pushed, one pulled.

Also: the tokenizer the run was given travels with the artifact, the base is pinned to the commit it was loaded
from, and the pushed repo loads with vanilla transformers as the plain merge.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from cli_fixtures import tiny_tokenizer
from conftest import tiny_llama_config
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from trainer_fixtures import sift_args, task_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from hf_sift import MergedDelta, MergedMaskedModel
from hf_sift.cli import main
from hf_sift.errors import BaseModelMismatchError
from hf_sift.hub import push_to_hub
from hf_sift.trainer import train_tasks


BASE_REPO, REPO = "me/acceptance-base", "me/acceptance"
TASKS = [f"task{i}" for i in range(1, 6)]
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def fetched(hub, repo_id: str) -> set[str]:
    """The files of `repo_id` downloaded since the log was cleared (by path in the repo)."""
    prefix = f"/{repo_id}/resolve/"
    return {r.path[len(prefix) :].split("/", 1)[1] for r in hub.requests if r.path.startswith(prefix)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, local_hub):
    """A tiny base (with its tokenizer) on the local Hub, loaded from there, and five tasks trained from it."""
    root = tmp_path_factory.mktemp("acceptance")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    api = HfApi()
    api.create_repo(BASE_REPO, exist_ok=True)
    base_sha = api.upload_folder(folder_path=root / "base", repo_id=BASE_REPO).oid
    model = AutoModelForCausalLM.from_pretrained(BASE_REPO)
    tokenizer = AutoTokenizer.from_pretrained(BASE_REPO)
    data = task_dataset(num_tasks=5, rows_per_task=4)
    data = data.map(lambda row: {"task": f"task{int(row['task'][1:]) + 1}"})
    args = sift_args(root / "runs", max_steps=2)
    delta = train_tasks(model, data, "task", args, root / "artifact", processing_class=tokenizer)
    return root / "artifact", delta, base_sha


def test_train_tasks_saves_the_tokenizer_with_the_artifact(trained):
    artifact, delta, _ = trained
    assert delta.task_ids == TASKS
    assert (delta.base_model, delta.base_revision) == (BASE_REPO, None)  # the push pins it (below)
    names = set(digests(artifact))
    assert names >= TOKENIZER_FILES and {"config.json", "model.safetensors"} <= names  # format 2, with P
    loaded, given = AutoTokenizer.from_pretrained(artifact), tiny_tokenizer()
    text = "w1 w2 w3 nothing w59"
    assert loaded(text)["input_ids"] == given(text)["input_ids"] and loaded.pad_token == "[PAD]"
    # The tokenizer files survive the artifact's own atomic saves, and a second run changes nothing.
    before = digests(artifact)
    MergedDelta.from_pretrained(artifact).save_pretrained(artifact)
    assert digests(artifact) == before


def test_push_five_tasks_then_serve_task_2_fetching_only_what_it_needs(trained, hub, tmp_path):
    artifact, _, base_sha = trained
    before = digests(artifact)
    # The base is recorded as a Hub id (no --base-model needed); its head is pinned once its weights pass the check.
    result = push_to_hub(artifact, REPO, license="apache-2.0")
    assert (result.base_model, result.base_revision) == (BASE_REPO, base_sha)
    assert MergedDelta.from_pretrained(REPO, cache_dir=tmp_path / "delta").base_revision == base_sha
    assert set(result.uploaded) >= TOKENIZER_FILES
    assert digests(artifact) == before

    hub.clear_requests()
    served = MergedMaskedModel.from_pretrained(REPO, task="task2", cache_dir=tmp_path / "cache")
    files = fetched(hub, REPO)
    # The config and manifest, the plain merge P (with its generation config), task2's mask, and the tokenizer:
    # never the sum, never another task's mask.
    assert files == {
        "sift_config.json",
        "sift_manifest.json",
        "model.safetensors",
        "generation_config.json",
        "masks/task2.safetensors",
    } | (TOKENIZER_FILES & files)
    assert not any(name.startswith("sift_delta") for name in files)
    others = {r.path.split("/resolve/")[0] for r in hub.requests if "/resolve/" in r.path} - {f"/{REPO}"}
    assert others <= {f"/{BASE_REPO}"}  # the base, as needed (its config), and nothing else
    local = MergedMaskedModel.from_pretrained(artifact, task="task2")
    expected = local.model.state_dict()
    for name, tensor in served.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_a_pushed_repo_loads_with_vanilla_transformers_as_the_plain_merge(trained, hub, tmp_path):
    artifact, _, _ = trained
    push_to_hub(artifact, REPO)  # a no-op when the previous test pushed it
    cache = tmp_path / "cache"
    vanilla = AutoModelForCausalLM.from_pretrained(REPO, cache_dir=cache)
    plain = MergedMaskedModel.from_pretrained(REPO, task=None, cache_dir=cache)
    ours, theirs = plain.model.state_dict(), vanilla.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(tensor, ours[name]), name
    # P is the merge of the five tasks, not the base.
    base = AutoModelForCausalLM.from_pretrained(BASE_REPO, cache_dir=cache).state_dict()
    assert any(not torch.equal(base[name], tensor) for name, tensor in theirs.items())
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        assert torch.equal(vanilla(ids).logits, plain(ids).logits)
    tokenizer = AutoTokenizer.from_pretrained(REPO, cache_dir=cache)
    assert tokenizer("w1 w2")["input_ids"] == tiny_tokenizer()("w1 w2")["input_ids"]


def test_an_unpinned_hub_base_is_pinned_only_when_its_weights_match(trained, hub):
    artifact, _, _ = trained
    api = HfApi()
    api.create_repo("me/acceptance-moving-base")
    torch.manual_seed(1)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(artifact.parent / "other-base")
    api.upload_folder(folder_path=artifact.parent / "other-base", repo_id="me/acceptance-moving-base")
    delta = MergedDelta.from_pretrained(artifact)
    delta.base_model = "me/acceptance-moving-base"  # recorded as a Hub id, without a commit
    with pytest.raises(BaseModelMismatchError):
        delta.push_to_hub("me/acceptance-moving")
    assert not api.repo_exists("me/acceptance-moving")  # a refused push creates nothing
    right = api.upload_folder(folder_path=artifact.parent / "base", repo_id="me/acceptance-moving-base").oid
    result = delta.push_to_hub("me/acceptance-moving")
    assert (result.base_model, result.base_revision) == ("me/acceptance-moving-base", right)
    # MergedDelta.push_to_hub publishes format 2: the plain merge written from the base, as the local save holds it.
    pushed = Path(api.hf_hub_download("me/acceptance-moving", "model.safetensors", cache_dir=artifact.parent / "c"))
    assert pushed.read_bytes() == (artifact / "model.safetensors").read_bytes()


def test_hf_sift_train_pins_the_commit_of_a_hub_base_and_keeps_its_tokenizer(trained, hub, tmp_path):
    _, _, base_sha = trained
    rows = [{"text": " ".join(f"w{(i * 7 + j) % 60}" for j in range(10)), "who": f"a{i % 2}"} for i in range(4)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["train", "--model", BASE_REPO, "--data", str(tmp_path / "data.jsonl"), "--task_column", "who",
            "--max_length", "12", "--artifact_dir", str(tmp_path / "merged"), "--output_dir", str(tmp_path / "runs"),
            "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "true", "--report_to", "none",
            "--disable_tqdm", "true"]  # fmt: skip
    assert main(argv) == 0
    delta = MergedDelta.from_pretrained(tmp_path / "merged")
    assert (delta.base_model, delta.base_revision) == (BASE_REPO, base_sha)
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "merged")("w3 w4")["input_ids"]
        == tiny_tokenizer()("w3 w4")["input_ids"]
    )


def test_the_model_card_is_part_of_the_one_push_commit(trained, hub, capsys):
    artifact, _, base_sha = trained
    repo = "me/acceptance-card"
    argv = ["push", str(artifact), repo, "--license", "mit", "--dataset", "org/data-a", "--dataset", "org/data-b"]
    assert main(argv) == 0
    assert [r.route for r in hub.requests].count("commit") == 1  # README.md travels in the push's one commit
    assert [c.title for c in HfApi().list_repo_commits(repo)] == ["hf_sift: push 5 merged task(s)", "initial commit"]
    card = ModelCard.load(repo)
    data = card.data
    assert (data.base_model, data.library_name, data.license) == (BASE_REPO, "hf-sift", "mit")
    assert data.tags == ["hf-sift", "sift-masks", "merge", "unlearning"]
    assert data.datasets == ["org/data-a", "org/data-b"]
    assert f"fine-tuned from [{BASE_REPO}](https://huggingface.co/{BASE_REPO}) at commit `{base_sha}`" in card.text
    assert "5 tasks are merged: `task1`, `task2`, `task3`, `task4`, `task5`." in card.text
    assert f'MergedMaskedModel.from_pretrained("{repo}", task="task1")' in card.text
    assert f'AutoModelForCausalLM.from_pretrained("{repo}")' in card.text  # format 2: the plain merge
    assert "## Unlearning log" in card.text and "carries no unlearning log" in card.text


def test_verify_a_repo_checks_its_plain_merge(trained, hub, tmp_path, capsys):
    artifact, _, _ = trained
    repo = "me/acceptance-verify"
    push_to_hub(artifact, repo)
    cache = str(tmp_path / "cache")
    assert main(["verify", repo, "--cache-dir", cache]) == 0
    capsys.readouterr()
    # The plain merge is what vanilla transformers users load: a byte flipped in it on the Hub is named.
    api = HfApi()
    data = bytearray(Path(api.hf_hub_download(repo, "model.safetensors", cache_dir=cache)).read_bytes())
    data[-1] ^= 0x01
    bad = api.create_commit(repo, [CommitOperationAdd("model.safetensors", bytes(data))], commit_message="flip").oid
    assert main(["verify", repo, "--cache-dir", cache]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{repo}@{bad}: ") and "model.safetensors" in out

"""Unlearning tasks from a published repo, against the local Hub through the unmodified huggingface_hub client."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_fixtures import save_model, task_rows, write_rows
from huggingface_hub import CommitOperationAdd, HfApi, RepoFile, hf_hub_download
from trainer_fixtures import sift_args, task_dataset, tiny_model
from transformers import AutoTokenizer

from hf_sift import MergedMaskedModel, unlearn
from hf_sift.cli import main
from hf_sift.errors import ConcurrentUpdateError, HubTransferError, ReplayPreconditionError
from hf_sift.hub import push_to_hub
from hf_sift.trainer import train_tasks
from hf_sift.unlearning_log import LOG_NAME


BASE = "me/unlearn-base"
TASKS = ["t1", "t2", "t3", "t4", "t5"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, local_hub):
    """Five tiny tasks trained on a base that is on the local Hub, their store, and fresh merges of the others."""
    root = tmp_path_factory.mktemp("hub-unlearn")
    tiny_model().save_pretrained(root / "base")
    api = HfApi()
    api.create_repo(BASE, exist_ok=True)
    api.upload_folder(folder_path=root / "base", repo_id=BASE)
    data = task_dataset(num_tasks=5, rows_per_task=4).map(lambda r: {"task": f"t{int(r['task'][1:]) + 1}"})
    args = sift_args(root / "runs", max_steps=2)
    # Trained from a local copy of the base (so the artifacts are format 2, with the plain merge P), pushed with the
    # base's Hub id (checked against its digests).
    kwargs = {"base_model": str(root / "base")}
    train_tasks(tiny_model(), data, "task", args, root / "five", task_vector_store=root / "store", **kwargs)
    train_tasks(tiny_model(), data, "task", args, root / "1245", tasks=["t1", "t2", "t4", "t5"], **kwargs)
    train_tasks(tiny_model(), data, "task", args, root / "145", tasks=["t1", "t4", "t5"], **kwargs)
    assert (root / "five" / "model.safetensors").is_file()
    push_to_hub(root / "1245", "me/fresh-1245", base_model=BASE)
    push_to_hub(root / "145", "me/fresh-145", base_model=BASE)
    return root, data, args


def repo_files(repo_id: str, cache_dir: Path, revision: str | None = None) -> dict[str, bytes]:
    return {
        name: Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir)).read_bytes()
        for name in HfApi().list_repo_files(repo_id, revision=revision)
    }


def tree(repo_id: str, revision: str) -> dict[str, RepoFile]:
    entries = HfApi().list_repo_tree(repo_id, revision=revision, recursive=True)
    return {e.path: e for e in entries if isinstance(e, RepoFile)}


def assert_equals_fresh_push(repo_id: str, fresh_id: str, forgotten: list[str], cache: Path) -> None:
    """The repo's files are those of a fresh push of the other tasks, plus the unlearning log; the card differs only
    by the repo's name and its "Unlearning log" section, which lists the removals."""
    got, fresh = repo_files(repo_id, cache), repo_files(fresh_id, cache)
    assert sorted(got) == sorted([*fresh, LOG_NAME])
    for name in fresh:
        if name != "README.md":
            assert got[name] == fresh[name], name
    card, fresh_card = got["README.md"].decode(), fresh["README.md"].decode()
    head, _, log = card.partition("## Unlearning log")
    assert head == fresh_card.partition("## Unlearning log")[0].replace(fresh_id.split("/")[1], repo_id.split("/")[1])
    assert [line.split(": removed ")[1].split(";")[0] for line in log.splitlines() if line.startswith("- ")] == [
        f"task `{t}`" for t in forgotten
    ]
    assert len(got[LOG_NAME].splitlines()) == len(forgotten)


def publish(world, repo_id: str) -> str:
    root, _, _ = world
    return push_to_hub(root / "five", repo_id, base_model=BASE).commit


def test_unlearning_a_repo_equals_a_fresh_push_of_the_others_and_squashes_history(world, hub, tmp_path, monkeypatch):
    import huggingface_hub

    _, data, _ = world
    api = HfApi()
    pushed = publish(world, "me/u-main")
    initial = api.list_repo_commits("me/u-main")[-1].commit_id
    api.create_tag("me/u-main", tag="v1", revision=pushed)  # holds task t3
    api.create_tag("me/u-main", tag="empty", revision=initial)  # holds no task
    api.create_branch("me/u-main", branch="old", revision=pushed)
    api.create_branch("me/u-main", branch="stripped", revision=pushed)  # no t3 mask, but the sum and P holding t3
    api.delete_file("masks/t3.safetensors", "me/u-main", revision="stripped")
    api.create_commit(
        "me/u-main", [CommitOperationAdd("notes.md", b"a proposal\n")], commit_message="notes", create_pr=True
    )
    old = tree("me/u-main", pushed)
    # A machine that has not downloaded the base yet: the plain merge P is still written (from the recorded base).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    hub.clear_requests()

    report = unlearn("me/u-main", "t3", model=tiny_model(), dataset=data, cache_dir=tmp_path / "cache")

    assert_equals_fresh_push("me/u-main", "me/fresh-1245", ["t3"], tmp_path / "cache")
    assert [(r.route, r.status) for r in hub.requests if r.route in ("commit", "super_squash")] == [
        ("commit", 200),
        ("super_squash", 200),
    ]
    assert report.parent == pushed and report.squashed and report.head == api.model_info("me/u-main").sha
    assert report.deleted == ["masks/t3.safetensors"]
    assert report.bytes_uploaded == sum(tree("me/u-main", report.head)[p].size for p in report.uploaded) > 0
    assert [t.task_id for t in report.tasks] == ["t3"] and report.replay_steps == 2
    assert report.refs_holding == ["refs/heads/old", "refs/heads/stripped", "refs/pr/1", "refs/tags/v1"]
    assert "refs/tags/v1 still holds a forgotten task" in str(report)
    # No revision of the branch holds t3's mask, or the sum or plain merge that held it.
    commits = api.list_repo_commits("me/u-main")
    assert len(commits) == 1 and commits[0].commit_id == report.head
    held = {(p, old[p].blob_id) for p in old if p.startswith("sift_delta") or p == "model.safetensors"}
    for commit in commits:
        files = tree("me/u-main", commit.commit_id)
        assert "masks/t3.safetensors" not in files
        assert not held & {(p, e.blob_id) for p, e in files.items()}
    assert "masks/t3.safetensors" in tree("me/u-main", "v1")  # the tag is left alone, and reported


def test_keep_history_keeps_the_earlier_commits(world, hub, tmp_path):
    root, _, _ = world
    pushed = publish(world, "me/u-keep")
    report = unlearn("me/u-keep", ["t3"], task_vector_store=root / "store", keep_history=True)
    api = HfApi()
    assert [c.commit_id for c in api.list_repo_commits("me/u-keep")][:2] == [report.commit, pushed]
    assert not report.squashed and report.head == report.commit and report.refs_holding == []
    assert "history of main kept" in str(report)
    assert "masks/t3.safetensors" in tree("me/u-keep", pushed)
    assert_equals_fresh_push("me/u-keep", "me/fresh-1245", ["t3"], tmp_path / "cache")


@pytest.mark.parametrize("change", ["data", "recipe"])
def test_a_replay_that_cannot_reproduce_is_refused_and_the_repo_is_unchanged(world, hub, change):
    root, data, args = world
    repo = f"me/u-refused-{change}"
    pushed = publish(world, repo)
    api = HfApi()
    commits = [c.commit_id for c in api.list_repo_commits(repo)]
    if change == "data":
        index = data["task"].index("t3")
        data = data.map(lambda r, i: {"input_ids": [(r["input_ids"][0] + 1) % 64, *r["input_ids"][1:]]} if i == index else {}, with_indices=True)  # fmt: skip
        args = None
    else:
        args = sift_args(root / "runs", max_steps=2, learning_rate=2e-2)
    hub.clear_requests()
    with pytest.raises(ReplayPreconditionError, match="cannot be replayed as recorded"):
        unlearn(repo, "t3", model=tiny_model(), dataset=data, args=args)
    assert [c.commit_id for c in api.list_repo_commits(repo)] == commits and commits[0] == pushed
    assert not [r for r in hub.requests if r.route in ("commit", "super_squash", "lfs_upload")]


@pytest.mark.parametrize("first_keeps_history", [True, False])
def test_two_racing_unlearnings_one_lands_the_other_is_refused_and_a_retry_succeeds(
    world, hub, monkeypatch, tmp_path, first_keeps_history
):
    import hf_sift.hub.unlearn as hub_unlearn

    root, _, _ = world
    store = root / "store"
    repo = f"me/u-race-{first_keeps_history}".lower()
    pushed = publish(world, repo)
    original = hub_unlearn.push_to_hub
    landed = {}

    def other_lands_first(*args, **kwargs):
        # Both started from `pushed`; the other request (t2) lands while this one (t3) is about to commit.
        monkeypatch.setattr(hub_unlearn, "push_to_hub", original)
        keep = first_keeps_history
        landed["t2"] = unlearn(repo, "t2", task_vector_store=store, parent_commit=pushed, keep_history=keep)
        return original(*args, **kwargs)

    monkeypatch.setattr(hub_unlearn, "push_to_hub", other_lands_first)
    hub.clear_requests()
    with pytest.raises(ConcurrentUpdateError, match="moved since the unlearning started from"):
        unlearn(repo, "t3", task_vector_store=store, parent_commit=pushed)
    # With the history kept, the stale commit is refused by the Hub (412); after a squash, its parent is gone.
    assert [r.status for r in hub.requests if r.route == "commit"] == ([200, 412] if first_keeps_history else [200])
    head = HfApi().model_info(repo).sha
    assert head == landed["t2"].head  # the refused one changed nothing
    assert "masks/t3.safetensors" in tree(repo, head) and "masks/t2.safetensors" not in tree(repo, head)

    retry = unlearn(repo, "t3", task_vector_store=store)
    assert retry.parent == head and retry.squashed
    assert_equals_fresh_push(repo, "me/fresh-145", ["t2", "t3"], tmp_path / "cache")


def test_the_unlearn_command_on_a_repo(world, hub, capsys, monkeypatch):
    root, _, _ = world
    pushed = publish(world, "me/u-cli")
    api = HfApi()
    api.create_tag("me/u-cli", tag="v1", revision=pushed)
    store = ["--task-vector-store", str(root / "store")]
    capsys.readouterr()
    for argv, words in [
        (["me/u-cli", "--task", "t9", *store], "unknown task 't9'"),
        (["me/u-cli", "--task", "t3", "--revision", "v1", *store], "'v1' is not a branch of me/u-cli"),
        (["me/u-none", "--task", "t3", *store], "not found on the Hugging Face Hub"),
        ([str(root / "five"), "--task", "t3", "--keep-history", *store], "apply to a Hub repo id"),
    ]:
        assert main(["unlearn", *argv]) == 2, argv
        err = capsys.readouterr().err  # after the download's progress bars, if any: one line
        assert err.count("hf-sift: error: ") == 1 and err.endswith("\n"), err
        assert err.splitlines()[-1].startswith("hf-sift: error: ") and words in err.splitlines()[-1], err
    assert api.model_info("me/u-cli").sha == pushed

    assert main(["unlearn", "me/u-cli", "--task", "t3", "--dry-run", *store]) == 0
    assert "dry run: would unlearn 1 task(s) from me/u-cli@" + pushed in capsys.readouterr().out
    assert api.model_info("me/u-cli").sha == pushed

    assert main(["unlearn", "me/u-cli", "--task", "t3", "--keep-history", *store]) == 0
    out = capsys.readouterr().out
    commit = api.model_info("me/u-cli").sha
    assert f"published to me/u-cli@main: commit {commit} (parent {pushed})" in out
    assert "warning: refs/tags/v1 still holds a forgotten task" in out

    import hf_sift.hub.unlearn as hub_unlearn

    def someone_commits_first(*args, **kwargs):
        api.upload_file(path_or_fileobj=b"notes\n", path_in_repo="notes.md", repo_id="me/u-cli")
        return push_to_hub(*args, **kwargs)

    monkeypatch.setattr(hub_unlearn, "push_to_hub", someone_commits_first)
    moved = api.model_info("me/u-cli").sha
    assert main(["unlearn", "me/u-cli", "--task", "t4", *store]) == 1
    err = capsys.readouterr().err
    assert err.count("hf-sift: error: ") == 1 and "me/u-cli@main moved since the unlearning started from" in err
    files = tree("me/u-cli", api.model_info("me/u-cli").sha)  # the other commit only: t4 is still there
    assert "notes.md" in files and "masks/t4.safetensors" in files and api.model_info("me/u-cli").sha != moved


def test_a_failed_squash_is_reported_and_the_commit_stays(world, hub):
    root, _, _ = world
    pushed = publish(world, "me/u-nosquash")
    hub.drop("super_squash")
    report = unlearn("me/u-nosquash", "t3", task_vector_store=root / "store")
    assert not report.squashed and report.squash_error and report.head == report.commit
    assert [c.commit_id for c in HfApi().list_repo_commits("me/u-nosquash")][:2] == [report.commit, pushed]
    assert "was NOT squashed" in str(report)


def train_and_push_with_the_cli(tmp_path: Path, base_repo: str, repo_id: str, fresh_id: str) -> Path:
    """`hf-sift train` two tasks (`a0`, `a1`) from a local model folder with its tokenizer, and the task `a1` alone;
    both pushed (`repo_id`, `fresh_id`) with the base's Hub id `base_repo`. Returns the data file."""
    save_model(tmp_path / "model")
    api = HfApi()
    api.create_repo(base_repo)
    api.upload_folder(folder_path=tmp_path / "model", repo_id=base_repo)
    data = write_rows(tmp_path / "data.jsonl", task_rows())
    common = ["--model", str(tmp_path / "model"), "--data", str(data), "--task_column", "who", "--max_length", "12",
              "--output_dir", str(tmp_path / "runs"), "--max_steps", "2", "--per_device_train_batch_size", "2",
              "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true"]  # fmt: skip
    assert main(["train", *common, "--artifact_dir", str(tmp_path / "merged")]) == 0
    assert main(["train", *common, "--artifact_dir", str(tmp_path / "a1"), "--tasks", "a1"]) == 0
    assert main(["push", str(tmp_path / "merged"), repo_id, "--base-model", base_repo]) == 0
    assert main(["push", str(tmp_path / "a1"), fresh_id, "--base-model", base_repo]) == 0
    return data


def test_the_unlearn_command_replays_against_a_repo(hub, tmp_path, capsys):
    data = train_and_push_with_the_cli(tmp_path, "me/cli-base", "me/u-cli-replay", "me/u-cli-a1")
    capsys.readouterr()

    # The base folder it was trained from.
    argv = ["unlearn", "me/u-cli-replay", "--task", "a0", "--data", str(data), "--task-column", "who", "--base",
            str(tmp_path / "model")]  # fmt: skip
    assert main([*argv, "--max-length", "11"]) == 2  # other rows than the recorded ones: refused, nothing changed
    assert "rows of task 'a0'" in capsys.readouterr().err.splitlines()[-1]
    assert len(HfApi().list_repo_commits("me/u-cli-replay")) == 2
    assert main([*argv, "--max-length", "12", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "history of main squashed" in capsys.readouterr().out
    assert_equals_fresh_push("me/u-cli-replay", "me/u-cli-a1", ["a0"], tmp_path / "cache")


def test_the_unlearn_command_replays_a_repo_with_its_own_tokenizer_and_recorded_base(hub, tmp_path, capsys):
    """Trained from a local folder, unlearned with nothing but the repo id and the data: the tokenizer pushed with the
    artifact and the base at its recorded commit, both loaded from the Hub. Their saved configs record how they were
    loaded (`"is_local": false`), and the tokenized rows another `datasets` fingerprint, than at training: the recipe
    compares content only, so the replay runs, and its task vector is checked bit for bit."""
    data = train_and_push_with_the_cli(tmp_path, "me/nobase-base", "me/u-nobase", "me/u-nobase-a1")
    api = HfApi()
    # The base's tokenizer changes after the training: the replay still uses the one it was trained with.
    changed = AutoTokenizer.from_pretrained(tmp_path / "model", padding_side="left")
    changed.save_pretrained(tmp_path / "changed")
    api.upload_folder(folder_path=tmp_path / "changed", repo_id="me/nobase-base")
    pushed = api.model_info("me/u-nobase").sha
    capsys.readouterr()

    argv = ["unlearn", "me/u-nobase", "--task", "a0", "--data", str(data), "--task-column", "who", "--max-length",
            "12", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"(parent {pushed})" in out and "history of main squashed" in out
    assert_equals_fresh_push("me/u-nobase", "me/u-nobase-a1", ["a0"], tmp_path / "cache")


def test_a_dropped_commit_changes_nothing_and_a_retry_succeeds(world, hub, tmp_path):
    root, _, _ = world
    pushed = publish(world, "me/u-drop")
    hub.drop("commit")
    with pytest.raises(HubTransferError, match="the unlearning commit to me/u-drop@main did not complete"):
        unlearn("me/u-drop", "t3", task_vector_store=root / "store", cache_dir=tmp_path / "cache")
    assert [c.commit_id for c in HfApi().list_repo_commits("me/u-drop")][0] == pushed
    report = unlearn("me/u-drop", "t3", task_vector_store=root / "store", cache_dir=tmp_path / "cache")
    assert report.parent == pushed and report.squashed
    assert_equals_fresh_push("me/u-drop", "me/fresh-1245", ["t3"], tmp_path / "cache")


def test_a_repo_keeps_its_own_tokenizer_and_the_base_tokenizer_is_read_through_the_cache(hub, tmp_path):
    """Real bases ship a tokenizer, and the Hub cache holds it as relative links into its blobs: writing the plain
    merge from that cache must not leave dangling links, and unlearning must not replace the repo's own tokenizer
    with the base's (it changes the artifact's files only)."""
    from cli_fixtures import tiny_tokenizer

    api = HfApi()
    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    api.create_repo("me/tok-base")
    api.upload_folder(folder_path=base, repo_id="me/tok-base")
    data = task_dataset(num_tasks=3, rows_per_task=4)
    kwargs = {"task_column": "task", "args": sift_args(tmp_path / "runs", max_steps=1), "base_model": str(base)}
    train_tasks(tiny_model(), data, output_dir=tmp_path / "three", task_vector_store=tmp_path / "store", **kwargs)
    train_tasks(tiny_model(), data, output_dir=tmp_path / "fresh", tasks=["t0", "t2"], **kwargs)
    assert (tmp_path / "three" / "tokenizer_config.json").is_file()  # linked from the base at the first save
    push_to_hub(tmp_path / "three", "me/tok", base_model="me/tok-base")
    push_to_hub(tmp_path / "fresh", "me/tok-fresh", base_model="me/tok-base")
    # The publisher's own tokenizer config (another chat template), committed after the push.
    own = b'{"chat_template": "{{ messages }}", "tokenizer_class": "PreTrainedTokenizerFast"}\n'
    api.upload_file(path_or_fileobj=own, path_in_repo="tokenizer_config.json", repo_id="me/tok")

    # A pull on the same machine puts the base's tokenizer into the cache's snapshot of the base, beside its weights.
    pulled = MergedMaskedModel.from_pretrained("me/tok", task="t0", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").glob("models--me--tok-base/snapshots/*/tokenizer_config.json"))
    # Its export copies the tokenizer out of the cache: a hard link to the cache's blob would let an in-place edit of
    # the exported file change the cache.
    pulled.save_pretrained(tmp_path / "export")
    exported = tmp_path / "export" / "tokenizer_config.json"
    assert not exported.is_symlink() and exported.stat().st_nlink == 1
    assert exported.read_bytes() == own

    report = unlearn("me/tok", "t1", task_vector_store=tmp_path / "store", cache_dir=tmp_path / "cache")

    assert [t.task_id for t in report.tasks] == ["t1"]
    assert not [p for p in report.uploaded if p.startswith("tokenizer") or p == "special_tokens_map.json"]
    got = repo_files("me/tok", tmp_path / "cache")
    assert got["tokenizer_config.json"] == own
    fresh = repo_files("me/tok-fresh", tmp_path / "cache")
    for name in fresh:  # every other file is what a fresh push of the merge without t1 holds
        if name not in ("README.md", "tokenizer_config.json"):
            assert got[name] == fresh[name], name

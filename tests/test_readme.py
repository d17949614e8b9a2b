"""The README's unlearning section runs as written, on a tiny model and dataset standing for its names."""

from __future__ import annotations

import re
from pathlib import Path

from trainer_fixtures import sift_args, task_dataset, tiny_model

from hf_sift import MergedDelta, train_tasks


README = Path(__file__).resolve().parent.parent / "README.md"


def section_code(title: str) -> list[str]:
    """The Python blocks of one `## title` section of the README."""
    text = README.read_text(encoding="utf-8")
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_unlearning_section_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = section_code("Unlearn a task exactly")
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)  # the README's folders ("merged", "private") are relative
    data = task_dataset(num_tasks=3, rows_per_task=4).rename_column("task", "author")
    data = data.map(lambda r: {"author": {"t0": "alice", "t1": "bob", "t2": "carol"}[r["author"]]})
    args = sift_args(tmp_path / "runs", max_steps=2)
    model = tiny_model()
    train_tasks(model, data, task_column="author", args=args, output_dir="merged")

    # the names the README defines in "Train many tasks into one merged artifact"; one session runs both blocks
    session = {"model": model, "data": data, "args": args, "train_tasks": train_tasks}
    exec(blocks[0], session)
    assert "unlearned 1 task(s)" in capsys.readouterr().out
    others = train_tasks(tiny_model(), data, "author", args, tmp_path / "alice+carol", tasks=["alice", "carol"])
    assert MergedDelta.from_pretrained("merged").digest == others.digest

    exec(blocks[1], session)
    others = train_tasks(tiny_model(), data, "author", args, tmp_path / "bob+carol", tasks=["bob", "carol"])
    assert MergedDelta.from_pretrained("merged-kept").digest == others.digest


def test_the_hub_section_runs_as_written_against_the_local_hub(tmp_path, monkeypatch, capsys, hub):
    import huggingface_hub
    from huggingface_hub import HfApi

    (block,) = section_code("Publish and unlearn on the Hub")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    # The README's base model, on the local Hub: a tiny model standing for it.
    tiny_model().save_pretrained(tmp_path / "base")
    api = HfApi()
    api.create_repo("HuggingFaceTB/SmolLM2-135M-Instruct", exist_ok=True)
    api.upload_folder(folder_path=tmp_path / "base", repo_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    # What the unlearning section leaves: "merged-kept" (bob and carol) and its private store.
    data = task_dataset(num_tasks=3, rows_per_task=4).rename_column("task", "author")
    data = data.map(lambda r: {"author": {"t0": "alice", "t1": "bob", "t2": "carol"}[r["author"]]})
    args = sift_args(tmp_path / "runs", max_steps=2)
    kept = {"tasks": ["bob", "carol"], "task_vector_store": "private", "base_model": str(tmp_path / "base")}
    train_tasks(tiny_model(), data, "author", args, "merged-kept", **kept)  # format 2: with the plain merge P
    api.create_repo("me/my-merge")  # a tag made before the unlearning keeps bob: the report says so
    hub.clear_requests()

    session: dict = {}
    original = HfApi.create_commit

    def tag_after_push(self, repo_id, *args, **kwargs):
        info = original(self, repo_id, *args, **kwargs)
        if not api.list_repo_refs(repo_id).tags:
            api.create_tag(repo_id, tag="v1", revision=info.oid)
        return info

    monkeypatch.setattr(HfApi, "create_commit", tag_after_push)
    exec(block, session)
    out = capsys.readouterr().out
    assert "unlearned 1 task(s)" in out and "history of main squashed" in out
    assert "warning: refs/tags/v1 still holds a forgotten task" in out
    assert session["carol"].task == "carol"
    assert [c.title for c in api.list_repo_commits("me/my-merge")] == [
        "hf_sift: squash the history of main after unlearning 1 task(s)"
    ]
    others = train_tasks(tiny_model(), data, "author", args, tmp_path / "carol", tasks=["carol"])
    assert MergedDelta.from_pretrained("me/my-merge").digest == others.digest
    assert session["report"].deleted == ["masks/bob.safetensors"]
    assert "model.safetensors" in session["report"].uploaded  # P rewritten without bob

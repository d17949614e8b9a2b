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

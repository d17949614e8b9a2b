"""Outputs never delete anything that was there: every command that writes refuses a non-empty output folder
unless `--overwrite` is given, and refuses outright an output that is, holds or lies inside one of its inputs."""

from __future__ import annotations

import os

import pytest
from cli_fixtures import qa_rows, save_artifact, save_finetunes, save_model, snapshot, task_rows, write_rows

from hf_sift import MergedDelta
from hf_sift.cli import main
from hf_sift.errors import OutputDirError
from hf_sift.merging import merge_checkpoints


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    base, models = save_finetunes(root)
    artifact, sift_base = save_artifact(root)
    model = save_model(root / "model")
    data = write_rows(root / "data.jsonl", task_rows())
    forget = write_rows(root / "forget.jsonl", qa_rows(0))
    retain = write_rows(root / "retain.jsonl", qa_rows(20))
    return root, base, models, artifact, sift_base, model, data, forget, retain


def untouched_after(root, argv, capsys, *, message, expected_code=2):
    before = snapshot(root)
    assert main(argv) == expected_code
    assert snapshot(root) == before
    err = capsys.readouterr().err
    if message is not None:
        assert message in err, err


def merge_argv(base, models, output, *extra):
    return ["merge", "--method", "soup", "--base", str(base), *map(str, models), "-o", str(output), *extra]


def test_merge_refuses_to_replace_or_overlap(inputs, tmp_path, capsys):
    root, base, models, artifact, *_ = inputs
    for output, message in [
        (artifact, "already exists and is not empty; pass --overwrite"),
        (base, "is the input"),
        (models[1], "is the input"),
        (base / "sub", "lies inside the input"),
        (root, "holds the input"),
    ]:
        untouched_after(root, merge_argv(base, models, output), capsys, message=message)
    for output in (base, models[0], base / "sub", root):  # --overwrite never lets an input be replaced
        untouched_after(root, merge_argv(base, models, output, "--overwrite"), capsys, message="the input")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "notes.txt").write_text("mine")
    untouched_after(tmp_path, merge_argv(base, models, tmp_path / "old"), capsys, message="--overwrite")
    assert main(merge_argv(base, models, tmp_path / "old", "--overwrite")) == 0
    assert (tmp_path / "old" / "merging_config.json").is_file()
    (tmp_path / "empty").mkdir()
    assert main(merge_argv(base, models, tmp_path / "empty")) == 0


def test_merge_through_a_symlink_is_an_overlap(inputs, tmp_path, capsys):
    root, base, models, *_ = inputs
    os.symlink(base, tmp_path / "link")
    untouched_after(root, merge_argv(base, models, tmp_path / "link", "--overwrite"), capsys, message="is the input")


def test_merge_checkpoints_refuses_an_input_as_output(inputs):
    root, base, models, *_ = inputs
    before = snapshot(root)
    for output in (base, models[0], base / "sub", root):
        with pytest.raises(OutputDirError):
            merge_checkpoints("soup", base, models, output)
    assert snapshot(root) == before


def test_export_refuses_to_replace_or_overlap(inputs, tmp_path, capsys):
    root, _, _, artifact, sift_base, *_ = inputs
    argv = ["export", str(artifact), "--task", "a", "-o"]
    untouched_after(root, [*argv, str(artifact), "--overwrite"], capsys, message="is the input")
    untouched_after(root, [*argv, str(artifact / "masks")], capsys, message="lies inside the input")
    untouched_after(root, [*argv, str(sift_base), "--overwrite"], capsys, message="is the input")  # recorded base
    other = save_model(tmp_path / "other-base", with_tokenizer=False)
    untouched_after(
        tmp_path, [*argv, str(other), "--base-model", str(other), "--overwrite"], capsys, message="is the input"
    )
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    untouched_after(tmp_path, [*argv, str(tmp_path / "out")], capsys, message="--overwrite")
    assert main([*argv, str(tmp_path / "out"), "--overwrite"]) == 0
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"  # export keeps the user's other files
    assert (tmp_path / "out" / "sift_export.json").is_file()


def train_argv(model, data, artifact, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--task-column", "who", "--artifact-dir",
            str(artifact), "--max-length", "12", "--max-steps", "1", "--per-device-train-batch-size", "2",
            "--use-cpu", "true", "--report-to", "none", "--disable-tqdm", "true", "--sign-seed", "3", *extra]  # fmt: skip


def test_train_refuses_an_input_as_artifact_or_run_folder(inputs, tmp_path, capsys):
    root, _, _, artifact, _, model, data, *_ = inputs
    untouched_after(root, train_argv(model, data, model, "--overwrite"), capsys, message="is the input")
    untouched_after(root, train_argv(model, data, root, "--overwrite"), capsys, message="holds the input")
    untouched_after(
        root, train_argv(model, data, tmp_path / "a", "--output-dir", str(model)), capsys, message="is the input"
    )
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    untouched_after(tmp_path, train_argv(model, data, tmp_path / "notes"), capsys, message="--overwrite")


def test_train_continues_an_artifact_and_keeps_other_files(inputs, tmp_path, monkeypatch):
    """Train with dash flags and no --output-dir in a clean working folder: nothing stray is left there, an existing
    artifact is continued without --overwrite, and the other files of its folder are kept."""
    root, _, _, _, _, model, data, *_ = inputs
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "merged"
    assert main(train_argv(model, data, out, "--tasks", "a0")) == 0
    (out / "notes.txt").write_text("mine")
    assert main(train_argv(model, data, out)) == 0
    assert MergedDelta.from_pretrained(out).task_ids == ["a0", "a1"]
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(cwd)) == []  # no trainer_output/ (nor anything else) in the working folder
    assert sorted(os.listdir(tmp_path)) == ["cwd", "merged"]


def test_negmerge_refuses_to_replace_or_overlap(inputs, tmp_path, capsys):
    root, *_, model, _, forget, retain = inputs
    argv = ["negmerge", "--model", str(model), "--forget-data", str(forget), "--retain-data", str(retain)]
    untouched_after(root, [*argv, "-o", str(model), "--overwrite"], capsys, message="is the input")
    untouched_after(root, [*argv, "-o", str(forget), "--overwrite"], capsys, message="is the input")
    untouched_after(root, [*argv, "-o", str(root), "--overwrite"], capsys, message="holds the input")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    untouched_after(tmp_path, [*argv, "-o", str(tmp_path / "out")], capsys, message="--overwrite")


def test_negmerge_leaves_nothing_in_the_working_folder(inputs, tmp_path, monkeypatch):
    root, *_, model, _, forget, retain = inputs
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    argv = ["negmerge", "--model", str(model), "--forget_data", str(forget), "--retain_data", str(retain),
            "--grid", "learning_rate=1e-2", "--train_arg", "max_steps=1", "--train-arg", "use_cpu=true",
            "--scalings", "0.5", "-o", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    assert os.listdir(cwd) == []
    assert (tmp_path / "out" / "negmerge_config.json").is_file()

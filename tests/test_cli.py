"""`hf-sift` as a user meets it: one-line errors and exit codes, missing inputs, flag values, spellings, fast help."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from cli_fixtures import qa_rows, save_artifact, save_finetunes, save_model, snapshot, write_rows

import hf_sift
from hf_sift.cli import main
from hf_sift.errors import CorruptArtifactError, PathNotFoundError
from hf_sift.hub.download import resolve_artifact


ROOT = Path(__file__).resolve().parents[1]


def one_error_line(capsys) -> str:
    """The error line, checked to be the only one and the last thing on stderr (progress bars may come before)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "hf-sift: error: " in line]
    assert len(errors) == 1 and errors[0].startswith("hf-sift: error: "), err
    assert err.endswith(errors[0] + "\n") and "Traceback" not in err, err
    return errors[0]


# ---------------------------------------------------------------- one line, exit codes, --debug


def test_parse_errors_are_one_line_with_exit_code_2(capsys):
    assert main(["merge", "--base", "b"]) == 2
    line = one_error_line(capsys)
    assert "the following arguments are required: --method" in line and "hf-sift merge --help" in line
    assert main(["merge", "--method", "nope", "--base", "b", "m", "-o", "o"]) == 2
    assert "invalid choice: 'nope'" in one_error_line(capsys)
    assert main(["nope"]) == 2
    assert "invalid choice: 'nope'" in one_error_line(capsys)
    assert main(["train", "--model", "m", "--data", "d.jsonl", "--artifact-dir", "a", "--no-such-flag", "1"]) == 2
    assert "--no-such-flag" in one_error_line(capsys)


def test_bad_input_is_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["merge", "--method", "soup", "--base", str(tmp_path / "nope"), str(tmp_path), "-o", "x"]) == 2
    line = one_error_line(capsys)
    assert "no such folder" in line and "Traceback" not in line


@pytest.mark.parametrize(
    "damaged,extra",
    [("model.safetensors", []), ("sift_delta.safetensors", ["--scale", "0.25"])],  # P; the sum (another scale)
)
def test_failed_check_is_one_line_with_exit_code_1(tmp_path, capsys, damaged, extra):
    artifact, _ = save_artifact(tmp_path)
    delta_file = artifact / damaged
    data = bytearray(delta_file.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor flipped: its digest no longer matches
    delta_file.write_bytes(bytes(data))
    assert main(["export", str(artifact), "--task", "a", "-o", str(tmp_path / "out"), *extra]) == 1
    line = one_error_line(capsys)
    assert "does not match its recorded digest" in line
    assert not (tmp_path / "out").exists()


def failing_command(monkeypatch, error: BaseException) -> None:
    def run_merge(args):
        raise error

    monkeypatch.setattr("hf_sift.merging.cli.run_merge", run_merge)


MERGE_ARGV = ["merge", "--method", "soup", "--base", "b", "m", "-o", "o"]


def test_exit_codes_by_error_class(monkeypatch, capsys):
    failing_command(monkeypatch, CorruptArtifactError("the sum is corrupt"))
    assert main(MERGE_ARGV) == 1
    assert one_error_line(capsys) == "hf-sift: error: the sum is corrupt"
    failing_command(monkeypatch, PathNotFoundError("no such folder"))
    assert main(MERGE_ARGV) == 2
    assert one_error_line(capsys) == "hf-sift: error: no such folder"
    # Not raised by hf_sift: one line naming the class, exit code 1.
    failing_command(monkeypatch, RuntimeError("boom\nsecond line"))
    assert main(MERGE_ARGV) == 1
    assert (
        one_error_line(capsys) == "hf-sift: error: RuntimeError: boom second line (run with --debug for the traceback)"
    )
    failing_command(monkeypatch, KeyboardInterrupt())
    assert main(MERGE_ARGV) == 130
    assert one_error_line(capsys) == "hf-sift: error: interrupted"


def test_debug_flag_and_variable_show_the_traceback(monkeypatch, capsys):
    failing_command(monkeypatch, PathNotFoundError("no such folder"))
    assert main([*MERGE_ARGV, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith("hf-sift: error: no such folder")
    assert main(["--debug", *MERGE_ARGV]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("HF_SIFT_DEBUG", "1")
    assert main(MERGE_ARGV) == 2
    assert "Traceback" in capsys.readouterr().err


def test_the_installed_command_exits_with_the_code(tmp_path):
    """The exit code as a shell sees it (the only test that needs a subprocess)."""
    proc = subprocess.run(
        [sys.executable, "-m", "hf_sift.cli", "merge", "--method", "soup", "--base", str(tmp_path / "nope"), "m",
         "-o", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("hf-sift: error: checkpoint ")


# ---------------------------------------------------------------- inputs that do not exist


def test_missing_artifact_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(PathNotFoundError, match="no such folder or file"):
        resolve_artifact(str(tmp_path / "nope"))
    with pytest.raises(PathNotFoundError, match="no such folder or file"):
        resolve_artifact("./nope/")


def test_name_that_could_be_a_repo_id_says_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("someone/no-such-artifact", "no-such-artifact"):
        with pytest.raises(PathNotFoundError, match="no such folder here, and not found on the Hugging Face Hub"):
            resolve_artifact(name, local_files_only=True)


def test_missing_inputs_on_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(tmp_path / "nope"), "-o", str(tmp_path / "out")]) == 2
    assert "the artifact" in (line := one_error_line(capsys)) and "no such folder or file" in line
    assert main(["export", "someone/nope", "--local-files-only", "-o", str(tmp_path / "out")]) == 2
    assert "not found on the Hugging Face Hub either" in one_error_line(capsys)
    base, models = save_finetunes(tmp_path)
    assert main(["merge", "--method", "soup", "--base", str(base), str(models[0]), "ft9", "-o", "out"]) == 2
    assert "checkpoint 'ft9': no such folder or file" in one_error_line(capsys)
    data = write_rows(tmp_path / "data.jsonl", [{"text": "w1", "task": "t"}])
    assert main(["train", "--model", "./nope", "--data", str(data), "--artifact-dir", "a"]) == 2
    assert "--model './nope': no such folder or file" in one_error_line(capsys)
    assert main(["train", "--model", str(base), "--data", "nope.jsonl", "--artifact-dir", "a"]) == 2
    assert "--data 'nope.jsonl': no such file" in one_error_line(capsys)
    assert (
        main(["train", "--model", str(base), "--data", str(data), "--task-column", "zz", "--artifact-dir", "a"]) == 2
    )
    assert "--task-column 'zz': the data has no such column; its columns are ['text', 'task']" in one_error_line(
        capsys
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "a").exists()


def test_model_that_could_be_a_repo_id_is_looked_up_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    data = write_rows(tmp_path / "data.jsonl", [{"text": "w1", "task": "t"}])
    assert main(["train", "--model", "someone/no-such-model", "--data", str(data), "--artifact-dir", "a"]) == 2
    line = one_error_line(capsys)
    assert "--model 'someone/no-such-model': no such folder here, and not found on the Hugging Face Hub" in line


# ---------------------------------------------------------------- negmerge flag values


@pytest.fixture(scope="module")
def negmerge_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("negmerge")
    model = save_model(root / "model")
    forget = write_rows(root / "forget.jsonl", qa_rows(0))
    retain = write_rows(root / "retain.jsonl", qa_rows(20))
    return root, ["negmerge", "--model", str(model), "--forget-data", str(forget), "--retain-data", str(retain)]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--grid", "no_such_field=1"], "--grid 'no_such_field=1': 'no_such_field' is not a TrainingArguments field"),
        (["--grid", "learning_rate=abc"], "--grid 'learning_rate=abc': argument --learning_rate"),
        (["--grid", "learning_rate"], "--grid 'learning_rate': expected ARG=VALUE"),
        (["--grid", "lr_scheduler_type=nope"], "--grid 'lr_scheduler_type=nope': argument --lr_scheduler_type"),
        (["--train-arg", "max_steps=x"], "--train-arg 'max_steps=x': argument --max_steps"),
        (["--train-arg", "output_dir=x"], "--train-arg 'output_dir=x': negmerge sets output_dir itself"),
        (["--scalings", "0.5,a"], "--scalings '0.5,a': 'a' is not a number"),
        (["--scalings", "nan"], "--scalings 'nan': λ must be finite"),
        (["--scalings", ","], "--scalings ',' holds no value"),
        (["--text-template", "{nope}"], "--text-template '{nope}': the data has no column 'nope'"),
        (["--text-template", "{question"], "--text-template '{question' is not a valid format string"),
        (["--text-template", "{0}"], "--text-template '{0}': name a column in braces"),
        (["--text-template", "plain"], "--text-template 'plain' names no column"),
    ],
)
def test_negmerge_flag_values_name_the_flag(negmerge_inputs, flags, expected, capsys):
    root, argv = negmerge_inputs
    assert main([*argv, *flags, "--train-arg", "max_steps=1", "-o", str(root / "out")]) == 2
    assert expected in one_error_line(capsys)
    assert not (root / "out").exists()


def test_negmerge_unlearn_refuses_an_output_dir_for_its_candidates(tiny_llama):
    from datasets import Dataset

    from hf_sift import negmerge_unlearn
    from hf_sift.errors import InvalidMergeParameterError

    data = Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[1, 2, 3]]})
    with pytest.raises(InvalidMergeParameterError, match="no output_dir"):
        negmerge_unlearn(
            tiny_llama, data, lambda m: (0.0, 1.0), grid={"learning_rate": [1e-3]}, training_args={"output_dir": "x"}
        )


# ---------------------------------------------------------------- flag spellings


def test_merge_accepts_both_spellings(tmp_path):
    base, models = save_finetunes(tmp_path)
    argv = ["merge", "--method", "soup", "--base", str(base), *map(str, models)]
    assert main([*argv, "--task-ids", "x,y", "--max-shard-size", "1GB", "-o", str(tmp_path / "dash")]) == 0
    assert main([*argv, "--task_ids", "x,y", "--max_shard_size", "1GB", "-o", str(tmp_path / "under")]) == 0
    assert snapshot(tmp_path / "dash") == snapshot(tmp_path / "under")


def test_every_long_flag_has_both_spellings():
    from hf_sift.cli import COMMANDS, build_parser

    for command in COMMANDS:
        if command == "train":  # HfArgumentParser gives every field both spellings (see test_train_both_spellings)
            continue
        parser = build_parser(command)
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        for action in sub._actions:
            longs = {o for o in action.option_strings if o.startswith("--") and o != "--help"}
            for option in longs:
                assert option.replace("-", "_").replace("__", "--", 1) in longs, (command, option)
                assert "--" + option[2:].replace("_", "-") in longs, (command, option)


def test_train_help_shows_both_spellings(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--artifact_dir ARTIFACT_DIR, --artifact-dir ARTIFACT_DIR" in out
    assert "--task_column TASK_COLUMN, --task-column TASK_COLUMN" in out


# ---------------------------------------------------------------- light imports, version


def imports_after(code: str) -> set[str]:
    """Top-level package names imported by running `code` in a fresh interpreter."""
    script = f"import sys\n{code}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    return set(out.stdout.split())


def test_import_and_help_do_not_import_torch():
    heavy = {"torch", "transformers", "peft", "datasets", "accelerate", "safetensors"}
    assert not imports_after("import hf_sift") & heavy
    for command in ("", "merge", "negmerge", "export", "push", "pull"):
        argv = [command, "--help"] if command else ["--help"]
        code = f"import contextlib, io\nfrom hf_sift.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n    main({argv!r})"
        assert not imports_after(code) & heavy, command
    # `train --help` lists every TrainingArguments field: it needs transformers, but not the Trainer.
    code = (
        "import contextlib, io\nfrom hf_sift.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['train', '--help'])\nprint('transformers.trainer' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}"], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["False"], out.stderr


def test_version_has_its_own_module():
    from hf_sift.version import __version__

    assert hf_sift.__version__ == __version__
    for path in (ROOT / "hf_sift").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and any(a.name == "__version__" for a in node.names):
                assert (
                    node.module == "version"
                    or (node.module or "").endswith(".version")
                    or node.module == ("hf_sift.version")
                ), f"{path}: from {'.' * node.level}{node.module or ''} import __version__"


def test_lazy_names_resolve():
    import hf_sift.merging
    import hf_sift.trainer

    for module in (hf_sift, hf_sift.merging, hf_sift.trainer):
        for name in module.__all__:
            assert getattr(module, name) is not None, (module.__name__, name)
    assert callable(hf_sift.trainer.train_tasks) and hf_sift.train_tasks is hf_sift.trainer.train_tasks
    assert callable(hf_sift.unlearn) and hf_sift.unlearn.__module__ == "hf_sift.unlearning"
    from hf_sift.merging import BUILTIN_METHODS, get_method

    for name, module in BUILTIN_METHODS.items():
        assert get_method(name).__module__ == f"hf_sift.merging.{module}"

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import perturbed

from hf_sift import MergedDelta, TaskVector
from hf_sift.artifact import CONFIG_NAME, DELTA_NAME, MANIFEST_NAME
from hf_sift.digest import state_dict_digest
from hf_sift.errors import CorruptArtifactError, IncompatibleArtifactError, InvalidTaskIdError, SiftError


SEED = 5


@pytest.fixture
def saved(tmp_path, tiny_llama_state, tiny_llama_dir) -> tuple[Path, MergedDelta, dict[str, TaskVector]]:
    tvs = {
        t: TaskVector.from_state_dicts(tiny_llama_state, perturbed(tiny_llama_state, i), SEED)
        for i, t in enumerate(["alice", "bob", "carol"])
    }
    delta = MergedDelta(tiny_llama_state, sign_seed=SEED, base_model=str(tiny_llama_dir), base_revision="r1")
    for task_id, tv in tvs.items():
        delta.add(task_id, tv)
    folder = tmp_path / "merged"
    delta.save_pretrained(folder)
    return folder, delta, tvs


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_and_config(saved, tiny_llama_dir):
    folder, delta, tvs = saved
    assert sorted(snapshot(folder)) == [
        "config.json",  # the plain merge P (format 2), a transformers checkpoint
        "generation_config.json",
        "masks/alice.safetensors",
        "masks/bob.safetensors",
        "masks/carol.safetensors",
        "model.safetensors",
        CONFIG_NAME,
        DELTA_NAME,
        MANIFEST_NAME,
    ]
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["format_version"] == 2 and config["num_tasks"] == 3 and config["sign_seed"] == SEED
    assert config["scale_bits"] == 40 and config["base_revision"] == "r1"
    assert config["base_model"] == str(tiny_llama_dir)
    assert config["base_digest"] == delta.base_digest and config["delta_digest"] == delta.digest
    manifest = json.loads((folder / MANIFEST_NAME).read_text())["tasks"]
    assert manifest["bob"]["digest"] == tvs["bob"].digest
    assert manifest["bob"]["mask_density"] == tvs["bob"].density
    assert manifest["bob"]["num_elements"] == tvs["bob"].num_elements


def test_reading_one_task_reads_only_its_mask(saved):
    folder, delta, _ = saved
    loaded = MergedDelta.from_pretrained(folder)
    (folder / "masks" / "alice.safetensors").unlink()  # other tasks' masks are never opened
    mask = loaded.load_mask("bob")
    assert all(torch.equal(mask[n], delta.load_mask("bob")[n]) for n in mask)
    with pytest.raises(CorruptArtifactError, match="missing"):
        loaded.load_mask("alice")


def test_user_files_survive_saves(saved):
    folder, delta, tvs = saved
    (folder / "tokenizer.json").write_text("{}")
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("keep me")
    delta.remove("carol", tvs["carol"])
    delta.save_pretrained(folder)
    assert (folder / "tokenizer.json").read_text() == "{}"
    assert (folder / "extra" / "notes.txt").read_text() == "keep me"
    assert not (folder / "masks" / "carol.safetensors").exists()
    assert [p.name for p in folder.parent.iterdir()] == ["merged"]  # no staging or backup left behind


def test_crash_mid_save_keeps_previous_artifact(saved, monkeypatch):
    folder, delta, tvs = saved
    before = snapshot(folder)
    delta.remove("bob", tvs["bob"])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr("hf_sift.artifact.split_torch_state_dict_into_shards", crash)
    with pytest.raises(KeyboardInterrupt):
        delta.save_pretrained(folder)
    assert snapshot(folder) == before
    assert [p.name for p in folder.parent.iterdir()] == ["merged"]
    assert MergedDelta.from_pretrained(folder).task_ids == ["alice", "bob", "carol"]


def corrupt_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda f: (f / DELTA_NAME).unlink(), "missing"),
        (lambda f: (f / CONFIG_NAME).unlink(), "missing"),
        (lambda f: (f / MANIFEST_NAME).write_text("{not json"), "JSON"),
        (lambda f: corrupt_byte(f / DELTA_NAME), "digest"),
        (lambda f: (f / DELTA_NAME).write_bytes((f / DELTA_NAME).read_bytes()[:1000]), "cannot read"),
        (lambda f: (f / DELTA_NAME).write_bytes(b"\x01"), "cannot read"),
    ],
)
def test_damaged_artifacts_are_refused(saved, damage, match):
    folder, _, _ = saved
    damage(folder)
    with pytest.raises(CorruptArtifactError, match=match) as err:
        MergedDelta.from_pretrained(folder)
    assert isinstance(err.value, ValueError)


def test_damaged_masks_are_refused(saved):
    folder, _, _ = saved
    loaded = MergedDelta.from_pretrained(folder)
    corrupt_byte(folder / "masks" / "alice.safetensors")
    with pytest.raises(CorruptArtifactError, match="digest"):
        loaded.load_mask("alice")
    path = folder / "masks" / "bob.safetensors"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CorruptArtifactError):
        loaded.load_mask("bob")


def test_newer_format_and_bad_manifest(saved):
    folder, _, _ = saved
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(IncompatibleArtifactError, match="upgrade"):
        MergedDelta.from_pretrained(folder)
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "future_key": 1}))
    with pytest.warns(UserWarning, match="future_key"):
        MergedDelta.from_pretrained(folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["tasks"]["../escape"] = manifest["tasks"]["alice"]
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(InvalidTaskIdError):
        MergedDelta.from_pretrained(folder)


def test_failed_operations_leave_the_merge_and_its_files_untouched(saved, tiny_llama_state):
    # A failed operation changes nothing in memory: saving after it rewrites exactly the previous bytes.
    folder, _, tvs = saved
    before = snapshot(folder)
    loaded = MergedDelta.from_pretrained(folder)
    failures = [
        lambda: loaded.remove("bob", tvs["alice"]),
        lambda: loaded.remove("dave", tvs["alice"]),
        lambda: loaded.add("alice", tvs["alice"]),
        lambda: loaded.add("../x", tvs["alice"]),
        lambda: loaded.materialize({k: v + 1 for k, v in tiny_llama_state.items()}, task="bob"),
        lambda: loaded.materialize(tiny_llama_state, task="nobody"),
    ]
    for fail in failures:
        with pytest.raises(SiftError):
            fail()
        loaded.save_pretrained(folder)
        assert snapshot(folder) == before
    # A failed save (a kept task's mask cannot be read) leaves the folder as it was.
    loaded.remove("carol", tvs["carol"])
    loaded._masks["alice"] = folder / "nowhere.safetensors"
    with pytest.raises(CorruptArtifactError, match="nowhere"):
        loaded.save_pretrained(folder)
    assert snapshot(folder) == before


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_and_folders_respect_the_umask(tmp_path, tiny_llama_state, umask):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from hf_sift import MergedMaskedModel

    torch.manual_seed(0)
    previous = os.umask(umask)
    try:
        LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
        base = LlamaForCausalLM.from_pretrained(tmp_path / "base").state_dict()
        delta = MergedDelta(
            base, sign_seed=SEED, base_model=str(tmp_path / "base"), base_model_digest=state_dict_digest(base)
        )
        delta.add("alice", TaskVector.from_state_dicts(base, perturbed(base, 1), SEED))
        delta.save_pretrained(tmp_path / "merged")
        delta.save_pretrained(tmp_path / "merged")  # a second save replaces the folder: same modes
        MergedMaskedModel.from_pretrained(tmp_path / "merged", task="alice").save_pretrained(tmp_path / "export")
    finally:
        os.umask(previous)
    for folder in (tmp_path / "merged", tmp_path / "export"):
        paths = [folder, *folder.rglob("*")]
        modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in paths}
        expected = {n: (0o777 if (tmp_path / n).is_dir() else 0o666) & ~umask for n in modes}
        assert modes == expected


def test_saving_with_a_kept_task_mask_deleted_is_refused_naming_the_file(saved):
    folder, _, tvs = saved
    loaded = MergedDelta.from_pretrained(folder)
    (folder / "masks" / "alice.safetensors").unlink()
    before = snapshot(folder)
    loaded.remove("carol", tvs["carol"])
    with pytest.raises(CorruptArtifactError, match="masks/alice.safetensors of task 'alice'"):
        loaded.save_pretrained(folder)
    assert snapshot(folder) == before
    # Removing the task whose own mask was deleted needs no mask: it succeeds.
    (folder / "masks" / "bob.safetensors").unlink()
    fresh = MergedDelta.from_pretrained(folder)
    fresh.remove("bob", tvs["bob"])
    fresh.remove("alice", tvs["alice"])
    fresh.save_pretrained(folder)
    assert sorted(p.name for p in (folder / "masks").iterdir()) == ["carol.safetensors"]


def test_a_missing_artifact_folder_is_named_as_such(tmp_path):
    from hf_sift.errors import PathNotFoundError

    with pytest.raises(PathNotFoundError, match=r"artifact folder .*nope does not exist"):
        MergedDelta.from_pretrained(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PathNotFoundError, match="is not a folder"):
        MergedDelta.from_pretrained(tmp_path / "file")

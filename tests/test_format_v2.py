"""Format 2: the plain merge P stored as a transformers checkpoint, and one task served from base + P + one mask."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import perturbed
from file_opens import files_opened
from test_masked_model import CONFIGS, IDS, build_artifact, logits
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from hf_sift import MergedDelta, MergedMaskedModel, TaskVector
from hf_sift.artifact import CONFIG_NAME, mask_filename
from hf_sift.errors import CorruptArtifactError


SERVED = [None, "t0", "t3", "t6"]


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def served_state(model: MergedMaskedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def only_files(source: Path, target: Path, keep: set[str]) -> Path:
    """Copy of `source` holding only the files `keep` (relative paths)."""
    for relative in keep:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / relative, target / relative)
    return target


def flip_in_tensor(path: Path, name: str) -> None:
    """Flip one byte inside the data of tensor `name` of a safetensors file."""
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    start, stop = json.loads(data[8 : 8 + header_size])[name]["data_offsets"]
    data[8 + header_size + (start + stop) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_format_2_serves_format_1_bits_and_loads_in_vanilla_transformers(tmp_path, arch):
    v2, base_dir, delta, base = build_artifact(tmp_path, arch)
    v1 = tmp_path / "v1"
    delta.save_pretrained(v1, base=None)  # the same merge in format 1
    assert json.loads((v1 / CONFIG_NAME).read_text())["format_version"] == 1
    assert json.loads((v2 / CONFIG_NAME).read_text())["format_version"] == 2
    for task in SERVED:
        from_sum = MergedMaskedModel.from_pretrained(v1, task=task, keep_delta=False)
        from_plain = MergedMaskedModel.from_pretrained(v2, task=task, keep_delta=False)
        assert_same_state(served_state(from_plain), served_state(from_sum))
        if task is not None:
            assert_same_state(served_state(from_plain), delta.materialize(base, task))
    # Vanilla transformers reads P: every tensor and the logits equal the plain merge served by hf_sift.
    auto = AutoModelForSeq2SeqLM if from_plain.config.is_encoder_decoder else AutoModelForCausalLM
    vanilla = auto.from_pretrained(v2)
    plain = MergedMaskedModel.from_pretrained(v2)
    assert_same_state(vanilla.state_dict(), served_state(plain))
    assert torch.equal(logits(vanilla), logits(plain))
    assert any(not torch.equal(vanilla.state_dict()[n], base[n]) for n in delta.names)


def test_switching_from_p_equals_format_1(tmp_path):
    v2, _, delta, base = build_artifact(tmp_path)
    model = MergedMaskedModel.from_pretrained(v2, task="t1")
    for task in ["t4", None, "t2"]:
        model.set_task(task)
        assert_same_state(served_state(model), delta.materialize(base, task))


def test_a_load_opens_only_base_p_and_one_mask(tmp_path):
    """The files the kernel sees opened while one task is served from a whole artifact: config, manifest, P, one mask."""
    v2, base_dir, delta, base = build_artifact(tmp_path)
    expected = delta.materialize(base, "t3")
    with files_opened(v2, base_dir) as opened:
        model = MergedMaskedModel.from_pretrained(v2, task="t3", keep_delta=False)
    assert_same_state(served_state(model), expected)
    in_artifact = {Path(p).relative_to(v2).as_posix() for p in opened if Path(p).is_relative_to(v2)}
    assert in_artifact == {"sift_config.json", "sift_manifest.json", "model.safetensors", mask_filename("t3")}
    assert str(base_dir / "model.safetensors") in opened
    # The same load from a folder holding only those files; the sum is read only for another dtype or scale.
    bare = only_files(v2, tmp_path / "bare", in_artifact)
    model = MergedMaskedModel.from_pretrained(bare, task="t3", keep_delta=False)
    assert_same_state(served_state(model), expected)
    with pytest.raises(CorruptArtifactError, match="sift_delta"):
        MergedMaskedModel.from_pretrained(bare, task="t3", scale=0.5)
    with files_opened(v2) as opened:
        MergedMaskedModel.from_pretrained(v2, task="t3", scale=0.5, keep_delta=False)
    assert str(v2 / "sift_delta.safetensors") in opened and str(v2 / "model.safetensors") not in opened


@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, None), (None, 0.5), (torch.float64, 0.25)])
def test_other_dtypes_and_scales_fall_back_to_the_sum(tmp_path, dtype, scale):
    v2, _, delta, _ = build_artifact(tmp_path)
    v1 = tmp_path / "v1"
    delta.save_pretrained(v1, base=None)
    from_v2 = MergedMaskedModel.from_pretrained(v2, task="t2", dtype=dtype, scale=scale)
    from_v1 = MergedMaskedModel.from_pretrained(v1, task="t2", dtype=dtype, scale=scale)
    assert_same_state(served_state(from_v2), served_state(from_v1))


@pytest.mark.parametrize("target", ["plain", "mask"])
def test_a_flipped_byte_is_refused_before_the_model_is_returned(tmp_path, target):
    v2, _, delta, base = build_artifact(tmp_path)
    name = delta.names[len(delta.names) // 2]
    path = v2 / ("model.safetensors" if target == "plain" else mask_filename("t1"))
    flip_in_tensor(path, name)
    with pytest.raises(CorruptArtifactError, match="digest"):
        MergedMaskedModel.from_pretrained(v2, task="t1")
    if target == "plain":  # verify=False skips the check (and serves the damaged P)
        model = MergedMaskedModel.from_pretrained(v2, verify=False)
        assert not torch.equal(model.model.state_dict()[name], delta.materialize(base, None)[name])


@pytest.mark.parametrize("field", ["plain_digests", "base_tensor_digests"])
def test_edited_plain_digests_are_refused(tmp_path, field):
    v2, *_ = build_artifact(tmp_path)
    config = json.loads((v2 / CONFIG_NAME).read_text())
    name = sorted(config[field])[0]
    config[field][name] = "blake3:" + "0" * 64
    (v2 / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CorruptArtifactError, match="binding_digest"):
        MergedDelta.from_pretrained(v2)


def test_p_after_add_and_remove_equals_a_fresh_merge(tmp_path):
    artifact, base_dir, delta, base = build_artifact(tmp_path, tasks=["t0", "t1", "t2"])
    extra = TaskVector.from_state_dicts(base, perturbed(base, 999), 7)
    loaded = MergedDelta.from_pretrained(artifact)
    loaded.add("t9", extra)
    loaded.save_pretrained(artifact)
    loaded = MergedDelta.from_pretrained(artifact)
    loaded.remove("t1", TaskVector.from_state_dicts(base, perturbed(base, 101), 7))
    loaded.save_pretrained(artifact)
    fresh_delta = MergedDelta(base, sign_seed=7, base_model=str(base_dir), base_model_digest=delta.base_model_digest)
    for task, seed in [("t0", 100), ("t2", 102)]:
        fresh_delta.add(task, TaskVector.from_state_dicts(base, perturbed(base, seed), 7))
    fresh_delta.add("t9", extra)
    fresh = tmp_path / "fresh"
    fresh_delta.save_pretrained(fresh)
    got = tree_bytes(artifact)
    assert "model.safetensors" in got and "config.json" in got
    assert got == tree_bytes(fresh)


def test_upgrade_equals_a_fresh_format_2_save(tmp_path, capsys):
    from hf_sift.cli import main

    v1, base_dir, delta, _ = build_artifact(tmp_path, fmt=1)
    fresh = tmp_path / "fresh"
    delta.save_pretrained(fresh, base=str(base_dir))
    assert main(["upgrade", str(v1)]) == 0
    assert "format 2" in capsys.readouterr().out
    assert tree_bytes(v1) == tree_bytes(fresh)
    assert torch.equal(
        logits(AutoModelForCausalLM.from_pretrained(v1), IDS), logits(MergedMaskedModel.from_pretrained(v1))
    )


def test_a_delta_without_a_base_saves_format_1_and_says_so(tmp_path, tiny_llama_state):
    delta = MergedDelta(tiny_llama_state, sign_seed=1)
    with pytest.warns(UserWarning, match="format 1"):
        delta.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["format_version"] == 1
    assert not (tmp_path / "a" / "model.safetensors").exists()


def test_upgrade_without_a_base_is_refused(tmp_path, tiny_llama_state, capsys):
    from hf_sift.cli import main

    delta = MergedDelta(tiny_llama_state, sign_seed=1)
    delta.save_pretrained(tmp_path / "a", base=None)
    before = tree_bytes(tmp_path / "a")
    assert main(["upgrade", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-sift: error: ") and "--base" in err and err.count("\n") == 1
    assert tree_bytes(tmp_path / "a") == before


def test_save_with_another_base_is_refused_and_writes_nothing(tmp_path):
    from hf_sift.errors import BaseModelMismatchError

    artifact, _, delta, _ = build_artifact(tmp_path, fmt=1)
    _, other_base, _, _ = build_artifact(tmp_path, tasks=["x"], seed=1)
    before = tree_bytes(artifact)
    loaded = MergedDelta.from_pretrained(artifact)
    with pytest.raises(BaseModelMismatchError, match="nothing was written"):
        loaded.save_pretrained(artifact, base=str(other_base))
    assert tree_bytes(artifact) == before


def test_tuned_parameters_outside_the_base_model_stay_format_1(tmp_path):
    """A peft adapter's parameters are not parameters of the base checkpoint: no plain checkpoint, format 1."""
    _, base_dir, _, base = build_artifact(tmp_path, tasks=["a"])
    adapter = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    state = {**base, adapter: torch.zeros(2, 16)}
    delta = MergedDelta(state, sign_seed=7, parameters=[adapter], base_model=str(base_dir))
    delta.add("t", TaskVector.from_state_dicts(state, perturbed(state, 5), 7, [adapter]))
    with pytest.warns(UserWarning, match="peft adapter"):
        delta.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())["format_version"] == 1
    assert not (tmp_path / "peft" / "model.safetensors").exists()


def test_saves_on_one_base_hash_it_once_until_its_files_change(tmp_path, monkeypatch):
    from hf_sift import base_digests

    artifact, base_dir, delta, base = build_artifact(tmp_path, tasks=["t0", "t1"])
    hashed: list[str] = []
    for function in ("digest_tensors", "state_dict_digest", "named_tensor_digest"):
        original = getattr(base_digests, function)
        monkeypatch.setattr(base_digests, function, lambda *a, _f=original, _n=function: hashed.append(_n) or _f(*a))
    for i in range(3):  # the base was hashed by build_artifact's save: never again while its files stay
        delta.save_pretrained(tmp_path / f"again-{i}")
        assert tree_bytes(tmp_path / f"again-{i}") == tree_bytes(artifact)
    assert hashed == []
    # Rewritten with the same weights: other files, hashed again (and once only).
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.save_pretrained(base_dir)
    delta.save_pretrained(tmp_path / "rewritten")
    delta.save_pretrained(tmp_path / "rewritten-2")
    assert hashed.count("digest_tensors") == 1 and hashed.count("state_dict_digest") == 1
    assert hashed.count("named_tensor_digest") == len(base)
    assert tree_bytes(tmp_path / "rewritten") == tree_bytes(artifact)
    # Other weights in the same files' place: found, never served from a stale digest.
    from hf_sift.errors import BaseModelMismatchError

    with torch.no_grad():
        next(iter(model.parameters())).add_(1.0)
    model.save_pretrained(base_dir)
    with pytest.raises(BaseModelMismatchError):
        delta.save_pretrained(tmp_path / "changed")
    assert not (tmp_path / "changed").exists()

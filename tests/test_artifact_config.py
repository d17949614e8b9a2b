"""sift_config.json and the manifest are checked field by field, and the fields deciding the served weights are bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import perturbed

from hf_sift import MergedDelta, TaskVector
from hf_sift.artifact import CONFIG_NAME, MANIFEST_NAME
from hf_sift.artifact_config import ArtifactConfig
from hf_sift.digest import state_dict_digest
from hf_sift.errors import CorruptArtifactError, IncompatibleArtifactError


# Toy state dicts, not models: there is no transformers checkpoint to write the plain merge P from, so these
# artifacts are format 1 by design (format 2 is exercised by the tests built on real tiny models).
pytestmark = pytest.mark.filterwarnings("ignore:this delta records no base model:UserWarning")


SEED = 3
BASE = {
    "a.weight": torch.randn(6, 4, generator=torch.Generator().manual_seed(0)),
    "b.weight": torch.randn(5, generator=torch.Generator().manual_seed(1)),
}


@pytest.fixture
def folder(tmp_path) -> Path:
    delta = MergedDelta(BASE, sign_seed=SEED, parameters=sorted(BASE))
    for i, task_id in enumerate(["alice", "bob"]):
        delta.add(task_id, TaskVector.from_state_dicts(BASE, perturbed(BASE, i), SEED))
    delta.save_pretrained(tmp_path / "merged")
    return tmp_path / "merged"


def edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def set_config(**fields):
    return lambda folder: edit(folder / CONFIG_NAME, lambda c: c.update(fields))


def edit_record(task_id, change):
    return lambda folder: edit(folder / MANIFEST_NAME, lambda m: change(m["tasks"][task_id]))


@pytest.mark.parametrize(
    "damage,error,match",
    [
        # In range but bound to the digests: S = 39 would serve every update at twice its size.
        (set_config(scale_bits=39), CorruptArtifactError, "binding_digest"),
        (set_config(scale_bits=80), CorruptArtifactError, r"'scale_bits' must be an integer in \[0, 62\], got 80"),
        (set_config(scale_bits="x"), CorruptArtifactError, "'scale_bits' must be an integer in .*got 'x'"),
        (set_config(format_version=0), CorruptArtifactError, "'format_version' must be an integer >= 1, got 0"),
        (set_config(format_version=-1), CorruptArtifactError, "'format_version' must be an integer >= 1, got -1"),
        (set_config(format_version=True), CorruptArtifactError, "'format_version' must be an integer >= 1, got True"),
        (set_config(format_version=3), IncompatibleArtifactError, "upgrade hf_sift"),
        (set_config(format_version=2), CorruptArtifactError, "'plain_digests' must be an object"),
        (set_config(plain_digests={"a.weight": "x"}), CorruptArtifactError, "'plain_digests' must be absent"),
        (
            set_config(format_version=2, plain_digests={"a.weight": "blake3:" + "0" * 64}),
            CorruptArtifactError,
            "'plain_digests' lacks tuned parameter",
        ),
        (
            set_config(format_version=2, plain_digests={"a.weight": "sha256:" + "0" * 64, "b.weight": "x"}),
            CorruptArtifactError,
            r"plain_digests\['a.weight'\]",
        ),
        (set_config(sign_seed="abc"), CorruptArtifactError, "'sign_seed' must be an integer, got 'abc'"),
        (set_config(sign_seed=True), CorruptArtifactError, "'sign_seed' must be an integer"),
        (set_config(sign_seed=SEED + 1), CorruptArtifactError, "binding_digest"),
        (set_config(num_tasks=-1), CorruptArtifactError, "'num_tasks' must be an integer >= 0"),
        (set_config(num_tasks=3), CorruptArtifactError, "'num_tasks' says 3 tasks"),
        (set_config(delta_digest="sha256:xyz"), CorruptArtifactError, "'delta_digest' must be"),
        (set_config(base_digest=None), CorruptArtifactError, "'base_digest' must be"),
        (set_config(base_model=7), CorruptArtifactError, "'base_model' must be a string or null"),
        (set_config(parameters=[]), CorruptArtifactError, "'parameters' must be"),
        (
            lambda f: edit(f / CONFIG_NAME, lambda c: c["parameters"]["shapes"].update({"a.weight": [6, "4"]})),
            CorruptArtifactError,
            r"parameters.shapes\['a.weight'\]",
        ),
        (
            lambda f: edit(f / CONFIG_NAME, lambda c: c["parameters"]["dtypes"].update({"b.weight": "int64"})),
            CorruptArtifactError,
            r"parameters.dtypes\['b.weight'\]",
        ),
        (
            lambda f: edit(f / CONFIG_NAME, lambda c: c["parameters"]["dtypes"].update({"b.weight": "bfloat16"})),
            CorruptArtifactError,
            "binding_digest",
        ),
        (
            lambda f: edit(f / CONFIG_NAME, lambda c: c["parameters"].update({"selection": {"include": ["("]}})),
            CorruptArtifactError,
            "parameters.selection",
        ),
        (
            lambda f: edit(f / CONFIG_NAME, lambda c: c["parameters"].update({"selection": {"include": []}})),
            CorruptArtifactError,
            "binding_digest",
        ),
        (edit_record("bob", lambda r: r.pop("mask_digest")), CorruptArtifactError, "'bob'.*mask_digest"),
        (edit_record("bob", lambda r: r.update(num_elements="9")), CorruptArtifactError, "'bob'.*'num_elements'"),
        (edit_record("alice", lambda r: r.update(mask_density=2.0)), CorruptArtifactError, "'alice'.*mask_density"),
        (edit_record("alice", lambda r: r.update(digest="sha256:" + "0" * 64)), CorruptArtifactError, "binding"),
        (
            lambda f: edit(f / MANIFEST_NAME, lambda m: m["tasks"].update(carol=m["tasks"].pop("bob"))),
            CorruptArtifactError,
            "binding_digest",
        ),
    ],
)
def test_edited_or_malformed_fields_are_refused(folder, damage, error, match):
    damage(folder)
    with pytest.raises(error, match=match):
        MergedDelta.from_pretrained(folder, verify=False)


def test_refused_artifact_is_not_served(tmp_path, tiny_llama_state):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from hf_sift import MergedMaskedModel

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    delta = MergedDelta(
        base, sign_seed=SEED, base_model=str(tmp_path / "base"), base_model_digest=state_dict_digest(base)
    )
    delta.add("t", TaskVector.from_state_dicts(base, perturbed(base, 1), SEED))
    delta.save_pretrained(tmp_path / "art")
    MergedMaskedModel.from_pretrained(tmp_path / "art", task="t")  # serves before the edit
    pristine = {p: p.read_bytes() for p in (tmp_path / "art" / CONFIG_NAME, tmp_path / "art" / MANIFEST_NAME)}
    edits = [
        set_config(scale_bits=39),
        set_config(scale_bits=80),
        set_config(scale_bits="x"),
        set_config(format_version=0),
        set_config(format_version=-1),
        set_config(format_version=True),
        set_config(sign_seed="abc"),
        edit_record("t", lambda r: r.pop("mask_digest")),
    ]
    for damage in edits:
        for path, data in pristine.items():
            path.write_bytes(data)
        damage(tmp_path / "art")
        with pytest.raises(CorruptArtifactError):
            MergedMaskedModel.from_pretrained(tmp_path / "art", task="t")


def test_artifact_without_binding_warns_and_loads(folder):
    edit(folder / CONFIG_NAME, lambda c: c.pop("binding_digest"))
    with pytest.warns(UserWarning, match="no binding_digest"):
        loaded = MergedDelta.from_pretrained(folder)
    assert loaded.task_ids == ["alice", "bob"]


def test_config_round_trip(folder):
    data = json.loads((folder / CONFIG_NAME).read_text())
    config = ArtifactConfig.from_dict(data)
    assert config.to_dict() == data
    assert (folder / CONFIG_NAME).read_text() == config.to_json_string()
    assert config.scale_bits == 40 and config.sign_seed == SEED and config.dtypes["a.weight"] == torch.float32

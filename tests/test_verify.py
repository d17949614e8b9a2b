"""verify_artifact: every file checked against the others; a flipped byte is found and its file named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import perturbed
from safetensors.torch import load_file, save_file

from hf_sift import MergedDelta, TaskVector, TaskVectorStore
from hf_sift.artifact import CONFIG_NAME, DELTA_NAME, MANIFEST_NAME, mask_filename, read_config, read_manifest
from hf_sift.digest import digest_tensors
from hf_sift.unlearning_log import LOG_NAME
from hf_sift.verify import verify_artifact


# Toy state dicts, not models: there is no transformers checkpoint to write the plain merge P from, so these
# artifacts are format 1 by design (format 2 is exercised by the tests built on real tiny models).
pytestmark = pytest.mark.filterwarnings("ignore:this delta records no base model:UserWarning")


SEED = 9
BASE = {
    "a.weight": torch.randn(30, 20, generator=torch.Generator().manual_seed(0)),
    "b.bias": torch.randn(11, generator=torch.Generator().manual_seed(1)),
}
VECTORS = {f"t{i}": TaskVector.from_state_dicts(BASE, perturbed(BASE, i, scale=0.1), SEED) for i in range(3)}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """An artifact of t0 and t2, after unlearning t1 (so it has a log), written once per module."""
    delta = MergedDelta(BASE, SEED)
    for task_id, vector in VECTORS.items():
        delta.add(task_id, vector)
    before = delta.digest
    delta.remove("t1", VECTORS["t1"])
    delta.log.append("t1", digest_before=before, digest_after=delta.digest, cost={"steps": 0})
    folder = tmp_path_factory.mktemp("good") / "artifact"
    delta.save_pretrained(folder, max_shard_size=10**9)
    return folder


@pytest.fixture
def artifact(good, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(good, copy)
    return copy


def flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_good_artifact_passes(artifact):
    assert verify_artifact(artifact) == []
    merged = MergedDelta(BASE, SEED)  # and one without a log
    merged.add("t0", VECTORS["t0"])
    merged.save_pretrained(artifact.parent / "plain")
    assert verify_artifact(artifact.parent / "plain") == []


def offsets(path, text: str) -> int:
    return path.read_bytes().index(text.encode())


@pytest.mark.parametrize(
    ("relative", "where"),
    [
        (DELTA_NAME, lambda p: -1),  # the last element of the sum
        (DELTA_NAME, lambda p: 9),  # the safetensors header
        (mask_filename("t2"), lambda p: -1),
        (mask_filename("t0"), lambda p: 12),
        (CONFIG_NAME, lambda p: offsets(p, json.loads(p.read_text())["delta_digest"]) + 20),
        (CONFIG_NAME, lambda p: offsets(p, '"num_tasks": 2') + 13),
        (CONFIG_NAME, lambda p: 0),
        (MANIFEST_NAME, lambda p: offsets(p, '"num_selected": ') + 16),
        (MANIFEST_NAME, lambda p: offsets(p, '"digest": "sha256:') + 8),
        (LOG_NAME, lambda p: offsets(p, '"task_id":"t1"') + 12),  # t1 -> t0
        (LOG_NAME, lambda p: offsets(p, '"digest_after":"sha256:') + 30),
        (LOG_NAME, lambda p: offsets(p, '"cost":{"steps":0}') + 16),
        (LOG_NAME, lambda p: -1),
    ],
)
def test_one_flipped_byte_fails_naming_the_file(artifact, relative, where):
    path = artifact / relative
    flip(path, where(path))
    problems = verify_artifact(artifact)
    assert problems, relative
    for problem in problems:
        assert relative in problem, problems


def test_missing_and_orphan_files_are_named(artifact):
    (artifact / mask_filename("t0")).rename(artifact / "masks" / "stray.safetensors")
    assert verify_artifact(artifact) == [
        f"{mask_filename('t0')}: missing (task 't0' is in {MANIFEST_NAME})",
        f"masks/stray.safetensors: belongs to no task of {MANIFEST_NAME}",
    ]
    (artifact / DELTA_NAME).unlink()
    assert any(DELTA_NAME in p and "missing" in p for p in verify_artifact(artifact))


def test_with_a_store_the_sum_config_and_masks_are_checked_against_the_task_vectors(artifact, tmp_path):
    store = TaskVectorStore(tmp_path / "store")
    for task_id in ("t0", "t2"):
        store.put(task_id, VECTORS[task_id])
    assert verify_artifact(artifact, store.directory) == []

    # Rewritten consistently (new sum, new delta_digest, new sign seed, binding digest recomputed): only the task
    # vectors can tell.
    def rewrite(**fields) -> None:
        config = read_config(artifact)
        for key, value in fields.items():
            setattr(config, key, value)
        config.binding_digest = config.compute_binding(read_manifest(artifact))
        (artifact / CONFIG_NAME).write_text(config.to_json_string())

    total = load_file(artifact / DELTA_NAME)
    total["a.weight"][0, 0] += 1
    save_file(total, artifact / DELTA_NAME, metadata={"format": "hf_sift-delta"})
    rewrite(delta_digest=digest_tensors(total), sign_seed=SEED + 1)
    (artifact / LOG_NAME).unlink()
    assert verify_artifact(artifact) == []
    problems = verify_artifact(artifact, store.directory)
    assert problems == [
        f"{CONFIG_NAME} or the store: the stored task vector {store.path(t)} has sign_seed={SEED}, scale_bits=40; "
        f"the merge has sign_seed={SEED + 1}, scale_bits=40"
        for t in ("t0", "t2")
    ]
    rewrite(sign_seed=SEED)
    assert verify_artifact(artifact, store.directory) == [
        f"{DELTA_NAME}: the sum is not the sum of the stored task vectors of its tasks"
    ]

    store.discard("t2")
    store.put("t2", VECTORS["t1"])
    assert verify_artifact(artifact, store.directory) == [
        f"{store.path('t2')} holds a task vector with digest {VECTORS['t1'].digest}, not the expected "
        f"{VECTORS['t2'].digest}"
    ]


def test_a_sharded_sum_is_verified_and_a_flipped_shard_named(tmp_path):
    delta = MergedDelta(BASE, SEED)
    delta.add("t0", VECTORS["t0"])
    delta.save_pretrained(tmp_path / "sharded", max_shard_size=2000)
    shards = sorted(p.name for p in tmp_path.glob("sharded/sift_delta-*.safetensors"))
    assert len(shards) == 2 and verify_artifact(tmp_path / "sharded") == []
    flip(tmp_path / "sharded" / shards[1], -1)
    problems = verify_artifact(tmp_path / "sharded")
    assert len(problems) == 1 and shards[1] in problems[0] and "differs from the delta_digest" in problems[0]


def test_an_artifact_unlearned_through_the_store_verifies(tmp_path):
    from trainer_fixtures import sift_args, task_dataset, tiny_model

    from hf_sift import train_tasks, unlearn

    data = task_dataset(num_tasks=3, rows_per_task=4)
    args = sift_args(tmp_path / "runs", max_steps=2)
    train_tasks(tiny_model(), data, args=args, output_dir=tmp_path / "merged", task_vector_store=tmp_path / "tv")
    unlearn(tmp_path / "merged", ["t1"], task_vector_store=tmp_path / "tv")
    assert len(MergedDelta.from_pretrained(tmp_path / "merged").log) == 1
    assert verify_artifact(tmp_path / "merged") == []
    assert verify_artifact(tmp_path / "merged", tmp_path / "tv") == []  # t1, still stored, is no task of it
    flip(tmp_path / "merged" / LOG_NAME, offsets(tmp_path / "merged" / LOG_NAME, '"task_id":"t1"') + 12)  # t1 -> t0
    assert verify_artifact(tmp_path / "merged") == [f"{LOG_NAME}: entry 0 does not match its own hash (altered)"]


def rewrite_plain(artifact, name: str, change) -> None:
    """Change tensor `name` of P, and record its new digest as a save would (the binding digest too)."""
    from hf_sift.artifact_config import CONFIG_NAME as CONFIG
    from hf_sift.digest import tensor_digest

    tensors = load_file(artifact / "model.safetensors")
    tensors[name] = change(tensors[name])
    save_file(tensors, artifact / "model.safetensors", metadata={"format": "pt"})
    config = read_config(artifact)
    config.plain_digests[name] = tensor_digest(tensors[name])
    config.binding_digest = config.compute_binding(read_manifest(artifact))
    (artifact / CONFIG).write_text(config.to_json_string(), encoding="utf-8")


@pytest.fixture(scope="module")
def good_v2(tmp_path_factory):
    from test_masked_model import build_artifact

    artifact, base_dir, delta, _ = build_artifact(tmp_path_factory.mktemp("v2"), tasks=["t0", "t1", "t2"])
    return artifact, base_dir, delta


@pytest.fixture
def v2(good_v2, tmp_path):
    artifact, base_dir, delta = good_v2
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    return copy, delta


def test_a_format_2_artifact_verifies_with_its_plain_merge_recomputed(v2, recwarn):
    artifact, _ = v2
    assert verify_artifact(artifact) == []
    assert not [w for w in recwarn if "recomputed" in str(w.message)]


def test_a_flipped_byte_in_the_plain_merge_is_named(v2):
    from test_format_v2 import flip_in_tensor

    artifact, delta = v2
    name = delta.names[0]
    flip_in_tensor(artifact / "model.safetensors", name)
    assert verify_artifact(artifact) == [f"model.safetensors: {name!r} does not match its digest in plain_digests"]


def test_a_plain_merge_that_is_not_the_sums_is_found(v2):
    artifact, delta = v2
    name = delta.names[-1]
    rewrite_plain(artifact, name, lambda t: t.clone().add_(1e-3))
    problems = verify_artifact(artifact)
    assert len(problems) == 1 and "is not what the sum gives" in problems[0] and repr(name) in problems[0]


def test_an_untuned_tensor_of_the_plain_merge_must_be_the_bases(v2):
    artifact, delta = v2
    name = "model.embed_tokens.weight"
    assert name not in delta.names
    rewrite_plain(artifact, name, lambda t: t.clone().mul_(2))
    assert verify_artifact(artifact) == [
        f"model.safetensors: {name!r} is not tuned, but differs from the base model's"
    ]


def test_without_the_base_the_plain_merge_is_checked_against_its_digests_only(v2):
    artifact, delta = v2
    config = json.loads((artifact / CONFIG_NAME).read_text())
    config["base_model"] = str(artifact.parent / "gone")  # not bound by the binding digest
    (artifact / CONFIG_NAME).write_text(json.dumps(config))
    rewrite_plain(artifact, delta.names[-1], lambda t: t.clone().add_(1e-3))
    with pytest.warns(UserWarning, match="not recomputed from the sum"):
        assert verify_artifact(artifact) == []


def test_hf_sift_verify_names_a_damaged_plain_merge(v2, capsys):
    from test_format_v2 import flip_in_tensor

    from hf_sift.cli import main

    artifact, delta = v2
    assert main(["verify", str(artifact)]) == 0
    flip_in_tensor(artifact / "model.safetensors", delta.names[1])
    capsys.readouterr()
    assert main(["verify", str(artifact)]) == 1
    out = capsys.readouterr().out
    assert f"model.safetensors: {delta.names[1]!r} does not match its digest in plain_digests" in out

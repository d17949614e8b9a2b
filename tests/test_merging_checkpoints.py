"""Streaming merges of checkpoints on disk: readers, writer, output folder, masks, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama_config
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from hf_sift.cli import main
from hf_sift.errors import ParameterMismatchError, SiftError
from hf_sift.masks import pack_bits, packed_size
from hf_sift.merging import (
    CheckpointReader,
    NegMergeAccumulator,
    StreamingCheckpointWriter,
    create_method,
    load_task_masks,
    merge_checkpoints,
    negated_state_dict,
    task_state_dict,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tied tiny Llama base and three fake fine-tunes (one of them sharded)."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    model.save_pretrained(root / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    states = []
    for i in range(3):
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(base_state[name] + 0.01 * torch.randn(param.shape, generator=gen))
        model.save_pretrained(root / f"ft{i}", max_shard_size="20KB" if i == 1 else "1GB")
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return root, base_state, states


def folder_state(folder) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return {n: reader.get(n) for n in reader.names()}


def test_reader_handles_shards_and_tied_weights(checkpoints):
    root, _, states = checkpoints
    sharded = CheckpointReader(root / "ft1")
    assert (root / "ft1" / "model.safetensors.index.json").exists()
    assert "lm_head.weight" not in sharded.names()  # tied: dropped by save_pretrained
    assert torch.equal(sharded.get("lm_head.weight"), states[1]["model.embed_tokens.weight"])
    for name in sharded.names():
        assert torch.equal(sharded.get(name), states[1][name])


def test_streaming_writer_round_trips(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(7, 5, generator=gen),
        "b": torch.randn(3, generator=gen).to(torch.bfloat16),
        "c": torch.arange(10, dtype=torch.int64),
        "d": torch.zeros(0),
    }
    writer = StreamingCheckpointWriter(tmp_path, {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}, 100)
    assert writer.split.is_sharded
    with pytest.raises(ParameterMismatchError):
        writer.write("zzz", tensors["a"])
    for name in writer.order:
        writer.write(name, tensors[name])
    writer.close()
    loaded = folder_state(tmp_path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)


@pytest.mark.parametrize("method_name", ["task_arithmetic", "ties", "dare", "magmax", "soup", "negmerge"])
def test_checkpoint_merge_equals_in_memory_merge(checkpoints, tmp_path, method_name):
    root, base_state, states = checkpoints
    method = create_method(method_name)
    out = merge_checkpoints(
        method, root / "base", [root / f"ft{i}" for i in range(3)], tmp_path / "out", max_shard_size="30KB"
    )
    merged = folder_state(out.output_dir)
    base_file = load_file(root / "base" / "model.safetensors")
    assert set(merged) == set(base_file)  # same tensors as the base (tied lm_head stays dropped)
    reference = create_method(method_name)
    reference.begin(["ft0", "ft1", "ft2"])
    for name in merged:
        expected = reference.merge_tensor(name, base_state[name], [s[name] for s in states]).tensor
        assert torch.equal(merged[name], expected), name
    # a valid transformers folder
    model = LlamaForCausalLM.from_pretrained(out.output_dir)
    assert torch.equal(model.lm_head.weight, merged["model.embed_tokens.weight"])
    card = (out.output_dir / "README.md").read_text()
    assert card.startswith("---\n") and f"- {method_name}\n" in card and "## Parameters" in card
    config = json.loads((out.output_dir / "merging_config.json").read_text())
    assert config["method"] == method_name and config["parameters"] == method.params.to_dict()
    assert (out.output_dir / "generation_config.json").exists()


def test_checkpoint_negmerge_equals_streaming_accumulator(checkpoints, tmp_path):
    root, base_state, states = checkpoints
    out = merge_checkpoints(
        "negmerge", root / "base", [root / f"ft{i}" for i in range(3)], tmp_path / "neg", params={"scaling": 0.7}
    )
    accumulator = NegMergeAccumulator(base_state)
    for state in states:
        accumulator.add(state)
    expected = negated_state_dict(base_state, accumulator.task_vector(), 0.7)
    for name, tensor in folder_state(out.output_dir).items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("method_name", ["tall_masks", "emr"])
def test_masks_round_trip_through_bit_packing(checkpoints, tmp_path, method_name):
    root, base_state, states = checkpoints
    out = merge_checkpoints(
        method_name, root / "base", [root / f"ft{i}" for i in range(3)], tmp_path / "loc", task_ids=["x", "y", "z"]
    )
    reference = create_method(method_name)
    reference.begin(["x", "y", "z"])
    expected = {
        n: reference.merge_tensor(n, base_state[n], [s[n] for s in states]).masks for n in folder_state(out.output_dir)
    }
    for i, task in enumerate(["x", "y", "z"]):
        packed = load_file(out.output_dir / "masks" / f"{task}.safetensors")
        masks = load_task_masks(out.output_dir, task)
        assert set(masks) == set(expected)
        for name, mask in masks.items():
            assert packed[name].dtype == torch.uint8 and packed[name].numel() == packed_size(mask.numel())
            assert torch.equal(mask, expected[name][i]), (task, name)
    config = json.loads((out.output_dir / "merging_config.json").read_text())
    if method_name == "emr":
        assert config["rescalers"] == reference.summary()["rescalers"]
        served = task_state_dict(out.output_dir, root / "base", "y")
        name = "model.layers.1.self_attn.q_proj.weight"
        merged = folder_state(out.output_dir)[name]
        mask = load_task_masks(out.output_dir, "y")[name]
        want = base_state[name] + (merged - base_state[name]) * mask * config["rescalers"]["y"]
        assert torch.equal(served[name], want)


def test_selection_copies_excluded_tensors(checkpoints, tmp_path):
    from hf_sift.selection import ParameterSelection

    root, base_state, _ = checkpoints
    selection = ParameterSelection(include=("mlp",), exclude=())
    out = merge_checkpoints(
        "soup", root / "base", [root / "ft0", root / "ft2"], tmp_path / "sel", parameters=selection
    )
    merged = folder_state(out.output_dir)
    for name, tensor in merged.items():
        assert torch.equal(tensor, base_state[name]) == ("mlp" not in name), name


def test_failed_merge_leaves_output_as_it_was(checkpoints, tmp_path):
    root, base_state, _ = checkpoints
    out = merge_checkpoints("soup", root / "base", [root / "ft0"], tmp_path / "keep")
    before = {p.name: p.read_bytes() for p in out.output_dir.iterdir() if p.is_file()}
    bad = tmp_path / "bad"
    bad.mkdir()
    state = load_file(root / "ft0" / "model.safetensors")
    state["model.norm.weight"] = torch.ones(3)
    save_file(state, bad / "model.safetensors")
    with pytest.raises(ParameterMismatchError):
        merge_checkpoints("soup", root / "base", [root / "ft0", bad], tmp_path / "keep")
    assert {p.name: p.read_bytes() for p in out.output_dir.iterdir() if p.is_file()} == before


def test_cli_merge(checkpoints, tmp_path):
    root, _, _ = checkpoints
    models = [str(root / f"ft{i}") for i in range(3)]
    code = main(["merge", "--method", "ties", "--base", str(root / "base"), *models, "-o", str(tmp_path / "cli"),
                 "--param", "density=0.5", "--param", "weights=1,1,2"])  # fmt: skip
    assert code == 0
    api = merge_checkpoints(
        "ties", root / "base", models, tmp_path / "api", params={"density": 0.5, "weights": (1.0, 1.0, 2.0)}
    )
    cli_state, api_state = folder_state(tmp_path / "cli"), folder_state(api.output_dir)
    assert all(torch.equal(cli_state[n], api_state[n]) for n in api_state)
    config = json.loads((tmp_path / "cli" / "merging_config.json").read_text())
    assert config["parameters"]["density"] == 0.5 and config["removal_cost"] == "all remaining"


def test_truncated_model_is_refused_naming_the_file(checkpoints, tmp_path):
    from hf_sift.merging.streaming import CheckpointError

    root, _, _ = checkpoints
    bad = tmp_path / "truncated"
    bad.mkdir()
    data = (root / "ft0" / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read {bad / 'model.safetensors'}") as err:
        merge_checkpoints("soup", root / "base", [root / "ft0", bad], tmp_path / "out")
    assert isinstance(err.value, SiftError) and isinstance(err.value, ValueError)
    assert not (tmp_path / "out").exists()


def artifact_files(folder) -> dict[str, bytes]:
    from hf_sift.artifact import is_artifact_file

    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and is_artifact_file(p.relative_to(folder).as_posix())
    }


def test_sift_merge_writes_a_real_artifact_that_serves_exports_and_unlearns(checkpoints, tmp_path, capsys):
    from hf_sift import MergedDelta, MergedMaskedModel, TaskVector
    from hf_sift.artifact import CONFIG_NAME, DELTA_NAME
    from hf_sift.digest import state_dict_digest
    from hf_sift.selection import DEFAULT_EXCLUDE

    root, _, states = checkpoints
    models = [str(root / f"ft{i}") for i in range(3)]
    out = tmp_path / "sift"
    args = ["merge", "--method", "sift", "--base", str(root / "base"), *models, "-o", str(out)]
    assert main([*args, "--param", "sign_seed=5"]) == 0
    assert (out / CONFIG_NAME).is_file() and (out / "model.safetensors").exists()  # format 2: P is a checkpoint
    assert torch.equal(  # vanilla transformers loads the plain merge
        LlamaForCausalLM.from_pretrained(out).state_dict()["model.norm.weight"],
        MergedMaskedModel.from_pretrained(out).model.state_dict()["model.norm.weight"],
    )
    assert load_file(out / DELTA_NAME)["model.norm.weight"].dtype == torch.int64

    # The same artifact as MergedDelta built in memory from θ0 as transformers loads it (tied lm_head included).
    base_state = LlamaForCausalLM.from_pretrained(root / "base").state_dict()
    expected = MergedDelta(
        base_state,
        sign_seed=5,
        base_model=str((root / "base").absolute()),
        base_model_digest=state_dict_digest(base_state),
    )
    vectors = {f"ft{i}": TaskVector.from_state_dicts(base_state, states[i], 5) for i in range(3)}
    for task_id, vector in vectors.items():
        expected.add(task_id, vector)
    expected.save_pretrained(tmp_path / "expected")
    assert artifact_files(out) == artifact_files(tmp_path / "expected")
    loaded = MergedDelta.from_pretrained(out)
    assert not any(name.split(".")[-2] in DEFAULT_EXCLUDE for name in loaded.names)  # no embeddings, no LM head
    assert "model.embed_tokens.weight" not in loaded.names and "lm_head.weight" not in loaded.names

    # Served and exported.
    served = MergedMaskedModel.from_pretrained(out, task="ft1")
    reference = expected.materialize(base_state, "ft1")
    for name, tensor in served.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    assert main(["export", str(out), "--task", "ft1", "-o", str(tmp_path / "export")]) == 0
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "export").state_dict()
    assert all(torch.equal(exported[n], reference[n]) for n in reference)
    served_task = task_state_dict(out, root / "base", "ft1")  # the base file's tensors (tied lm_head dropped)
    assert set(served_task) == set(CheckpointReader(root / "base").names())
    assert all(torch.equal(served_task[n], reference[n]) for n in served_task)
    masks = load_task_masks(out, "ft2")
    assert all(torch.equal(pack_bits(masks[n]), vectors["ft2"].packed_masks[n]) for n in loaded.names)

    # The card's claim is true: removing a task from its checkpoint gives the bytes of a fresh merge of the others.
    card = (out / "README.md").read_text()
    assert "Exact removal supported: yes" in card
    loaded.remove("ft1", TaskVector.from_state_dicts(base_state, folder_state(root / "ft1"), 5, loaded.names))
    loaded.save_pretrained(out)
    others = [models[0], models[2]]
    assert main(["merge", "--method", "sift", "--base", str(root / "base"), *others, "-o", str(tmp_path / "fresh"),
                 "--param", "sign_seed=5"]) == 0  # fmt: skip
    assert artifact_files(out) == artifact_files(tmp_path / "fresh")


def test_sift_merge_refuses_a_scaling(checkpoints, tmp_path):
    from hf_sift.merging import InvalidMergeParameterError

    root, _, _ = checkpoints
    with pytest.raises(InvalidMergeParameterError, match="chosen when it is served"):
        merge_checkpoints("sift", root / "base", [root / "ft0"], tmp_path / "out", params={"scaling": 0.5})
    assert not (tmp_path / "out").exists()

"""MergedMaskedModel: served weights, task switching, export, errors (tiny models, offline)."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import perturbed, tiny_llama_config
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BartConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    T5Config,
)

from hf_sift import MergedDelta, MergedMaskedModel, TaskVector
from hf_sift.artifact import CONFIG_NAME, DELTA_NAME, mask_filename
from hf_sift.digest import digest_tensors, state_dict_digest
from hf_sift.errors import (
    BaseModelMismatchError,
    CorruptArtifactError,
    DeltaNotKeptError,
    InvalidScaleError,
    MissingBaseModelError,
    ParameterMismatchError,
    RemoteCodeError,
    ReservedArgumentError,
    ServingDtypeError,
    UnknownTaskError,
    UnsupportedHubPushError,
    UnsupportedOffloadError,
)
from hf_sift.hub import download
from hf_sift.masked_model import EXPORT_RECORD_NAME
from hf_sift.offload import offload_slots
from hf_sift.served_weights import served_tensor


SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
CONFIGS = {
    "llama": lambda: tiny_llama_config(),
    "gpt2": lambda: GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64),
    "qwen2": lambda: Qwen2Config(**SMALL, num_key_value_heads=1, max_position_embeddings=64),
    "gemma": lambda: GemmaConfig(**SMALL, num_key_value_heads=1, head_dim=8, max_position_embeddings=64),
    "mistral": lambda: MistralConfig(**SMALL, num_key_value_heads=1, max_position_embeddings=64),
    "opt": lambda: OPTConfig(
        vocab_size=64,
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    ),
    "gpt_neox": lambda: GPTNeoXConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    ),
    "phi3": lambda: Phi3Config(**SMALL, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0),
    "bart": lambda: BartConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
    ),
    "t5": lambda: T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0
    ),
}
IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
TASKS = [f"t{i}" for i in range(7)]


def build_artifact(
    folder: Path,
    arch: str = "llama",
    tasks: list[str] = TASKS,
    seed: int = 0,
    record_base: bool = True,
    edit=None,
    fmt: int = 2,
) -> tuple[Path, Path, MergedDelta, dict[str, torch.Tensor]]:
    """Save a tiny base model and a merge of fake fine-tunes of it; returns (artifact, base, delta, θ0).

    `fmt` 2 stores the plain merge P (the default when the base is known), 1 only the sum."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config)
    if edit is not None:
        edit(model)
    base_dir = folder / f"base-{arch}-{seed}"
    model.save_pretrained(base_dir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    delta = MergedDelta(
        base,
        sign_seed=7,
        base_model=str(base_dir) if record_base else None,
        base_model_digest=state_dict_digest(base),
    )
    for i, task in enumerate(tasks):
        delta.add(task, TaskVector.from_state_dicts(base, perturbed(base, 100 + i), 7))
    artifact = folder / f"artifact-{arch}-{seed}-v{fmt}"
    delta.save_pretrained(artifact, base=None if fmt == 1 else str(base_dir))
    return artifact, base_dir, delta, base


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    artifact, base_dir, delta, base = build_artifact(tmp_path_factory.mktemp("llama"))
    tiny_tokenizer().save_pretrained(artifact)
    return artifact, base_dir, delta, base


@pytest.fixture(scope="module")
def llama_v1(tmp_path_factory):
    """The same merge as `llama`, saved as format 1 (no plain merge)."""
    artifact, base_dir, delta, base = build_artifact(tmp_path_factory.mktemp("llama_v1"), fmt=1)
    tiny_tokenizer().save_pretrained(artifact)
    return artifact, base_dir, delta, base


def assert_serves(model: MergedMaskedModel, expected: dict[str, torch.Tensor]) -> None:
    state = model.model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name


def logits(model, ids=IDS):
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
        return model(ids).logits


# ---------------------------------------------------------------------- served weights


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_served_weights_equal_materialize(tmp_path, arch):
    artifact, _, delta, base = build_artifact(tmp_path, arch)
    model = MergedMaskedModel.from_pretrained(artifact, task="t1")
    assert model.task == "t1" and model.tasks == TASKS
    expected = delta.materialize(base, "t1")
    assert_serves(model, expected)
    assert any(not torch.equal(expected[n], base[n]) for n in delta.names)
    # It behaves as the plain transformers model holding those weights.
    plain = type(model.model)(model.config)
    plain.load_state_dict(expected)
    plain.eval()
    assert torch.equal(logits(model), logits(plain))
    generated = model.generate(IDS, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, plain.generate(IDS, max_new_tokens=3, do_sample=False))


def test_plain_merge_when_task_is_none(llama):
    artifact, _, delta, base = llama
    model = MergedMaskedModel.from_pretrained(artifact)
    assert model.task is None
    assert_serves(model, delta.materialize(base, None))


def test_set_task_equals_fresh_load(llama):
    artifact, _, delta, base = llama
    model = MergedMaskedModel.from_pretrained(artifact, task="t0")
    model.set_task("t3")
    model.set_task("t5")
    assert model.task == "t5"
    fresh = MergedMaskedModel.from_pretrained(artifact, task="t5")
    assert_serves(model, fresh.model.state_dict())
    assert_serves(model, delta.materialize(base, "t5"))
    model.set_task(None)
    assert model.task is None
    assert_serves(model, delta.materialize(base, None))


def test_sharded_sum_and_sharded_base(llama, tmp_path):
    artifact, base_dir, delta, base = llama
    sharded_base = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(base_dir).save_pretrained(sharded_base, max_shard_size="20KB")
    assert len(list(sharded_base.glob("model-*.safetensors"))) > 1
    sharded = tmp_path / "sharded"
    delta.save_pretrained(sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("sift_delta-*.safetensors"))) > 1
    model = MergedMaskedModel.from_pretrained(sharded, task="t2", base_model=sharded_base)
    assert_serves(model, delta.materialize(base, "t2"))
    model.set_task("t6")
    assert_serves(model, delta.materialize(base, "t6"))


def test_scale_is_passed_through(llama):
    artifact, _, delta, base = llama
    model = MergedMaskedModel.from_pretrained(artifact, task="t2", scale=0.5)
    assert model.scale == 0.5
    assert_serves(model, delta.materialize(base, "t2", scale=0.5))


def test_keep_delta_false_serves_the_same_and_cannot_switch(llama):
    artifact, _, delta, base = llama
    model = MergedMaskedModel.from_pretrained(artifact, task="t4", keep_delta=False)
    assert model.delta is None and model._base_weights is None
    assert model.tasks == TASKS
    assert_serves(model, delta.materialize(base, "t4"))
    with pytest.raises(DeltaNotKeptError):
        model.set_task("t1")
    assert model.task == "t4"
    assert_serves(model, delta.materialize(base, "t4"))


def test_bfloat16_rounds_once_from_float64(llama):
    artifact, base_dir, delta, base = llama
    model = MergedMaskedModel.from_pretrained(artifact, task="t1", dtype=torch.bfloat16)
    vanilla = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).state_dict()
    masks = delta.load_mask("t1")

    def expected_for():
        out = dict(vanilla)
        for name in delta.names:
            target = torch.empty(base[name].shape, dtype=torch.bfloat16)
            out[name] = served_tensor(
                base[name],
                delta.sum[name],
                masks[name],
                scale=delta.default_scale(),
                scale_bits=delta.scale_bits,
                out=target,
            )
        return out

    assert_serves(model, expected_for())
    model.set_task("t2")
    masks = delta.load_mask("t2")
    assert_serves(model, expected_for())


# ---------------------------------------------------------------------- the wrapped model


def test_behaves_like_the_wrapped_model(llama):
    artifact, *_ = llama
    model = MergedMaskedModel.from_pretrained(artifact, task="t1")
    assert model.config is model.model.config
    assert model.device == torch.device("cpu")
    assert model.generation_config is model.model.generation_config
    assert model.to("cpu") is model
    assert model.to(torch.float64) is model and model.dtype == torch.float64
    assert not model.training
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    assert ids.tolist() == [[1, 2, 3]]
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 5)
    assert "t1" in repr(model)


def test_set_task_after_a_dtype_change_serves_in_the_new_dtype(llama):
    """After `to(dtype)`, a switch rounds once from float64 to the new dtype, as a fresh load in that dtype does."""
    artifact, *_ = llama
    model = MergedMaskedModel.from_pretrained(artifact, task="t1")
    model.set_task("t2")  # the plain-merge weights now exist, in float32
    model.to(torch.float64)
    model.set_task("t3")
    assert_serves(
        model, MergedMaskedModel.from_pretrained(artifact, task="t3", dtype=torch.float64).model.state_dict()
    )
    model.to(torch.bfloat16)
    model.set_task("t4")
    assert_serves(
        model, MergedMaskedModel.from_pretrained(artifact, task="t4", dtype=torch.bfloat16).model.state_dict()
    )


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}])
def test_device_map_is_passed_to_transformers(llama, monkeypatch, device_map):
    artifact, _, delta, base = llama
    seen = []
    load = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    model = MergedMaskedModel.from_pretrained(artifact, task="t1", device_map=device_map)
    assert seen == [device_map]
    assert model.device == torch.device("cpu")
    assert_serves(model, delta.materialize(base, "t1"))
    model.set_task("t2")
    assert_serves(model, delta.materialize(base, "t2"))


DISK_OFFLOAD = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def offloaded_weights(model: MergedMaskedModel, names: list[str]) -> dict[str, torch.Tensor]:
    """What accelerate's hooks load for each parameter, offloaded or not."""
    slots = offload_slots(model.model, names)
    state = model.model.state_dict()
    return {n: slots[n].read() if n in slots else state[n] for n in names}


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_disk_offloaded_parameters_are_served(llama, tmp_path, dtype):
    # transformers leaves disk-offloaded parameters on the meta device behind accelerate hooks: serving must change
    # what the hooks load, or the model would silently run on θ0.
    artifact, base_dir, delta, base = llama
    model = MergedMaskedModel.from_pretrained(artifact, task="t1", device_map=DISK_OFFLOAD, dtype=dtype)
    offloaded = [n for n, p in model.model.named_parameters() if p.device.type == "meta"]
    assert offloaded and set(offloaded) <= set(delta.names)
    for task in ("t1", "t3", None, "t1"):
        if task != model.task:
            model.set_task(task)
        fresh = MergedMaskedModel.from_pretrained(artifact, task=task, dtype=dtype)
        expected = fresh.model.state_dict()
        served = offloaded_weights(model, delta.names)
        assert all(torch.equal(served[n], expected[n]) and served[n].dtype == expected[n].dtype for n in delta.names)
        assert torch.equal(logits(model), logits(fresh))
    plain = AutoModelForCausalLM.from_pretrained(base_dir, device_map=DISK_OFFLOAD, dtype=dtype)
    assert not torch.equal(logits(plain), logits(model))
    model.save_pretrained(tmp_path / "export", task="t2")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=dtype)
    assert torch.equal(logits(exported), logits(MergedMaskedModel.from_pretrained(artifact, task="t2", dtype=dtype)))


def test_meta_parameter_without_offload_hook_is_refused(llama, monkeypatch):
    artifact, _, delta, _ = llama
    load = AutoModelForCausalLM.from_pretrained.__func__

    def half_loaded(cls, *args, **kwargs):
        model = load(cls, *args, **kwargs)
        up = model.model.layers[0].mlp.up_proj
        up.weight = torch.nn.Parameter(torch.empty_like(up.weight, device="meta"))
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(half_loaded))
    with pytest.raises(UnsupportedOffloadError, match="up_proj.*no accelerate hook"):
        MergedMaskedModel.from_pretrained(artifact, task="t1")


def test_model_kwargs_reach_the_base_load_and_reserved_ones_are_refused(llama):
    artifact, _, delta, base = llama
    model = MergedMaskedModel.from_pretrained(artifact, task="t1", model_kwargs={"attn_implementation": "eager"})
    assert model.config._attn_implementation == "eager"
    assert_serves(model, delta.materialize(base, "t1"))
    for refused in ({"dtype": torch.float16}, {"quantization_config": {}}, {"trust_remote_code": True}):
        with pytest.raises(ReservedArgumentError, match=next(iter(refused))):
            MergedMaskedModel.from_pretrained(artifact, task="t1", model_kwargs=refused)
    with pytest.raises(TypeError, match="model_kwargs"):
        MergedMaskedModel.from_pretrained(artifact, task="t1", model_kwargs=["attn_implementation"])


def test_export_loads_in_vanilla_transformers(llama, tmp_path):
    artifact, _, delta, base = llama
    model = MergedMaskedModel.from_pretrained(artifact, task="t0")
    out = tmp_path / "export"
    (out).mkdir()
    (out / "README.md").write_text("mine")
    (out / "model.safetensors").write_bytes(b"stale")
    model.save_pretrained(out, task="t6")
    assert model.task == "t0"
    assert_serves(model, delta.materialize(base, "t0"))
    vanilla = AutoModelForCausalLM.from_pretrained(out)
    assert_serves(vanilla_as_served(vanilla), delta.materialize(base, "t6"))
    model.set_task("t6")
    assert torch.equal(logits(vanilla), logits(model))
    assert (out / "README.md").read_text() == "mine"
    assert AutoTokenizer.from_pretrained(out)("w4").input_ids == [4]
    record = json.loads((out / EXPORT_RECORD_NAME).read_text())
    assert record["task"] == "t6" and record["base_digest"] == delta.base_digest


class vanilla_as_served:  # noqa: N801 - adapter so assert_serves reads a plain model
    def __init__(self, model):
        self.model = model


def test_export_of_encoder_decoder(tmp_path):
    artifact, _, delta, base = build_artifact(tmp_path, "t5", tasks=["a", "b"])
    model = MergedMaskedModel.from_pretrained(artifact, task="b")
    model.save_pretrained(tmp_path / "export")
    vanilla = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "export")
    assert torch.equal(logits(vanilla), logits(model))


# ---------------------------------------------------------------------- errors


def test_unknown_task_lists_some_and_the_count(llama):
    artifact, *_ = llama
    with pytest.raises(UnknownTaskError, match=r"'nope'.*'t0'.*7 in all"):
        MergedMaskedModel.from_pretrained(artifact, task="nope")
    model = MergedMaskedModel.from_pretrained(artifact, task="t1")
    with pytest.raises(UnknownTaskError):
        model.set_task("nope")
    assert model.task == "t1"


def test_base_mismatch_raises_unless_overridden(llama, tmp_path):
    artifact, _, delta, base = llama
    _, other_base, _, other = build_artifact(tmp_path, "llama", tasks=["x"], seed=1)
    with pytest.raises(BaseModelMismatchError, match="allow_base_mismatch"):
        MergedMaskedModel.from_pretrained(artifact, task="t1", base_model=other_base)
    with pytest.warns(UserWarning, match="differ"):
        model = MergedMaskedModel.from_pretrained(artifact, task="t1", base_model=other_base, allow_base_mismatch=True)
    assert_serves(model, delta.materialize(other, "t1", verify_base=False))


def test_base_of_another_architecture(llama, tmp_path):
    artifact, *_ = llama
    other = AutoModelForCausalLM.from_config(CONFIGS["gpt2"]())
    other.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ParameterMismatchError):
        MergedMaskedModel.from_pretrained(artifact, task="t1", base_model=tmp_path / "gpt2", allow_base_mismatch=True)


def test_missing_base_model_name(tmp_path):
    artifact, base_dir, delta, base = build_artifact(tmp_path, tasks=["a", "b"], record_base=False)
    with pytest.raises(MissingBaseModelError, match="base_model="):
        MergedMaskedModel.from_pretrained(artifact, task="a")
    model = MergedMaskedModel.from_pretrained(artifact, task="a", base_model=base_dir)
    assert_serves(model, delta.materialize(base, "a"))


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "fmt,damage",
    [
        *((1, d) for d in ["no_config", "no_sum", "sum_flipped", "no_mask", "mask_flipped"]),
        *((2, d) for d in ["no_config", "no_plain", "plain_flipped", "no_mask", "mask_flipped"]),
    ],
)
def test_missing_or_corrupted_files(llama, llama_v1, tmp_path, fmt, damage):
    source, *_ = llama if fmt == 2 else llama_v1
    artifact = tmp_path / "artifact"
    shutil.copytree(source, artifact)
    target = {
        "no_config": CONFIG_NAME,
        "no_sum": DELTA_NAME,
        "sum_flipped": DELTA_NAME,
        "no_plain": "model.safetensors",
        "plain_flipped": "model.safetensors",
        "no_mask": mask_filename("t1"),
        "mask_flipped": mask_filename("t1"),
    }[damage]
    if damage.startswith("no_"):
        (artifact / target).unlink()
    else:
        corrupt(artifact / target)
    with pytest.raises(CorruptArtifactError):
        MergedMaskedModel.from_pretrained(artifact, task="t1")


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "header"])
def test_set_task_to_a_corrupted_mask_keeps_the_previous_task(llama, tmp_path, damage):
    source, _, delta, base = llama
    artifact = tmp_path / "artifact"
    shutil.copytree(source, artifact)
    model = MergedMaskedModel.from_pretrained(artifact, task="t0")
    path = artifact / mask_filename("t2")
    if damage == "flip":  # a data byte: found by the digest, after the mapped mask was used
        corrupt(path)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-3])
    elif damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"\xff" * 16 + path.read_bytes()[16:])
    with pytest.raises(CorruptArtifactError):
        model.set_task("t2")
    assert model.task == "t0"
    assert_serves(model, delta.materialize(base, "t0"))


def test_dtype_that_cannot_hold_the_weights(tmp_path):
    def enlarge(model):  # fits float32, overflows float16 (max 65504)
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.mul_(1e6)

    artifact, *_ = build_artifact(tmp_path, tasks=["a", "b"], edit=enlarge)
    with pytest.raises(ServingDtypeError, match="up_proj"):
        MergedMaskedModel.from_pretrained(artifact, task="a", dtype=torch.float16)
    with pytest.raises(ServingDtypeError, match="floating-point"):
        MergedMaskedModel.from_pretrained(artifact, task="a", dtype=torch.int8)
    assert MergedMaskedModel.from_pretrained(artifact, task="a", dtype="bfloat16").dtype == torch.bfloat16


def test_switch_that_overflows_restores_the_previous_task(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    name = "model.layers.0.mlp.up_proj.weight"
    with torch.no_grad():
        model.get_parameter(name).fill_(65000.0)  # representable in float16 (max 65504)
    model.save_pretrained(tmp_path / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    delta = MergedDelta(base, sign_seed=7, base_model=str(tmp_path / "base"))
    calm = perturbed(base, 1)
    calm[name] = base[name].clone()  # no update there: masked out, θ0 is served
    hot = perturbed(base, 2)
    hot[name] = base[name] + 2000.0  # served as 65000 + 1000 on the masked half: inf in float16
    delta.add("calm", TaskVector.from_state_dicts(base, calm, 7))
    delta.add("hot", TaskVector.from_state_dicts(base, hot, 7))
    delta.save_pretrained(tmp_path / "artifact")

    with pytest.raises(ServingDtypeError, match="up_proj"):
        MergedMaskedModel.from_pretrained(tmp_path / "artifact", task="hot", dtype=torch.float16)
    served = MergedMaskedModel.from_pretrained(tmp_path / "artifact", task="calm", dtype=torch.float16)
    before = {k: v.clone() for k, v in served.model.state_dict().items()}
    with pytest.raises(ServingDtypeError, match="up_proj"):
        served.set_task("hot")
    assert served.task == "calm"
    for key, tensor in served.model.state_dict().items():
        assert torch.equal(tensor, before[key]), key


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "lm_head.weight"])
def test_base_with_other_embeddings_or_lm_head_is_refused(llama, tmp_path, name):
    artifact, base_dir, delta, base = llama
    assert name not in delta.names  # not tuned, but served as they are
    other = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        other.get_parameter(name).add_(1.0)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(BaseModelMismatchError, match="embeddings or LM head"):
        MergedMaskedModel.from_pretrained(artifact, task="t1", base_model=tmp_path / "other")
    with pytest.warns(UserWarning, match="serving anyway"):
        MergedMaskedModel.from_pretrained(artifact, task="t1", base_model=tmp_path / "other", allow_base_mismatch=True)
    with pytest.raises(BaseModelMismatchError):
        delta.check_base_model(other.state_dict())
    delta.check_base_model(AutoModelForCausalLM.from_pretrained(base_dir).state_dict())


def test_artifact_without_a_base_model_digest_warns_and_serves(tmp_path):
    """An older (format 1) artifact; format 2 checks the whole base against its per-tensor digests instead."""
    artifact, _, delta, base = build_artifact(tmp_path, tasks=["a"], fmt=1)
    config = json.loads((artifact / CONFIG_NAME).read_text())
    del config["base_model_digest"], config["binding_digest"]
    (artifact / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="no digest of the whole base model"):
        model = MergedMaskedModel.from_pretrained(artifact, task="a")
    assert_serves(model, delta.materialize(base, "a"))


# ---------------------------------------------------------------------- Hub resolution


@pytest.mark.parametrize("weights", ["sum", "plain", "all", None])
def test_allow_patterns_name_only_the_needed_files(llama, weights):
    from huggingface_hub.utils import filter_repo_objects

    # The listing of a repo holding the artifact (plus sharded weights, a look-alike mask and unrelated files),
    # filtered by huggingface_hub's own matcher, the one snapshot_download applies to `allow_patterns`.
    artifact, _, _, _ = llama
    listing = [p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file()]
    shards = ["sift_delta-00001-of-00002.safetensors", "sift_delta-00002-of-00002.safetensors"]
    plain_shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    extra = [*shards, "sift_delta.safetensors.index.json", "masks/t30.safetensors", "masks/xt3.safetensors"]
    listing += [*extra, *plain_shards, "model.safetensors.index.json", "README.md", ".gitattributes"]
    listing += ["notes/t3.safetensors", "adapter_model.safetensors", "adapter_config.json"]  # a peft P
    needed = {"sift_config.json", "sift_manifest.json"}
    needed |= {
        "sum": {DELTA_NAME, *shards, "sift_delta.safetensors.index.json"},
        "plain": {"model.safetensors", *plain_shards, "model.safetensors.index.json"},
        # A one-task copy that stays a whole artifact: the sum and P (a transformers or a peft checkpoint).
        "all": {DELTA_NAME, *shards, "sift_delta.safetensors.index.json", "model.safetensors", *plain_shards}
        | {"model.safetensors.index.json", "config.json", "adapter_model.safetensors", "adapter_config.json"},
        None: set(),
    }[weights]
    tokenizer = {name for name in listing if name.startswith("tokenizer")} | {"generation_config.json"}
    assert tokenizer  # the fixture saved one
    for task in (None, "t3"):
        patterns = download.artifact_allow_patterns(task, weights=weights)
        selected = set(filter_repo_objects(listing, allow_patterns=patterns))
        mask = set() if task is None else {mask_filename(task)}
        assert selected == needed | tokenizer | mask
        bare = download.artifact_allow_patterns(task, False, weights)
        assert set(filter_repo_objects(listing, allow_patterns=bare)) == needed | mask


@pytest.mark.parametrize("fmt", [1, 2])
def test_repo_id_downloads_only_config_weights_and_one_mask(llama, llama_v1, tmp_path, monkeypatch, fmt):
    """A fake Hub: snapshot/file downloads copy from the artifact folder into a commit-named snapshot folder.
    Format 2 fetches P and never the sum; format 1 the sum."""
    source, _, delta, base = llama if fmt == 2 else llama_v1
    snapshot = tmp_path / "snapshots" / ("a" * 40)
    fetched: list[str] = []

    def fetch(relative: str) -> Path:
        fetched.append(relative)
        (snapshot / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / relative, snapshot / relative)
        return snapshot / relative

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        # The first download names the branch; later ones the commit it resolved to.
        assert repo_id == "org/merged" and revision == ("main" if not fetched else snapshot.name)
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(relative, p) for p in allow_patterns):
                fetch(relative)
        return str(snapshot)

    def fake_hf_hub_download(repo_id, filename, revision=None, **kwargs):
        assert revision == snapshot.name
        return str(fetch(filename))

    monkeypatch.setattr(download, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(download, "hf_hub_download", fake_hf_hub_download)
    model = MergedMaskedModel.from_pretrained("org/merged", task="t1", revision="main")
    masks = [f for f in fetched if f.startswith("masks/")]
    assert masks == [mask_filename("t1")]
    weights, other = (DELTA_NAME, "model.safetensors") if fmt == 1 else ("model.safetensors", DELTA_NAME)
    assert {"sift_config.json", "sift_manifest.json", weights, "tokenizer.json"} <= set(fetched)
    assert other not in fetched
    assert_serves(model, delta.materialize(base, "t1"))
    model.set_task("t2")
    assert [f for f in fetched if f.startswith("masks/")] == [mask_filename("t1"), mask_filename("t2")]
    assert_serves(model, delta.materialize(base, "t2"))
    assert other not in fetched
    if fmt == 2:  # another scale is served from the sum, fetched then from the same commit
        fetched.clear()
        scaled = MergedMaskedModel.from_pretrained("org/merged", task="t1", revision="main", scale=0.5)
        assert DELTA_NAME in fetched and "model.safetensors" not in fetched
        assert_serves(scaled, delta.materialize(base, "t1", scale=0.5))


# ---------------------------------------------------------------------- huge-page buffers


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_served_weights_in_huge_page_buffers(tmp_path, monkeypatch, arch):
    """Served weights land in one huge-page allocation (forced here for tiny models): same bits, same behaviour."""
    from hf_sift import arena

    if not arena.huge_pages_available():
        pytest.skip("no MADV_HUGEPAGE on this platform")
    monkeypatch.setattr(arena, "_MIN_BYTES", 0)
    artifact, base_dir, delta, base = build_artifact(tmp_path, arch)
    base_bytes = (base_dir / "model.safetensors").read_bytes()
    model = MergedMaskedModel.from_pretrained(artifact, task="t1")
    params = dict(model.model.named_parameters())
    assert len({params[n].untyped_storage().data_ptr() for n in delta.names if n in params}) == 1
    assert_serves(model, delta.materialize(base, "t1"))
    for name in delta.names:  # θ0 is only read
        assert torch.equal(model._base_weights[name], base[name]), name
    model.set_task("t4")
    assert_serves(model, delta.materialize(base, "t4"))
    model.save_pretrained(tmp_path / "export")
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert torch.equal(logits(vanilla), logits(model))
    dropped = MergedMaskedModel.from_pretrained(artifact, task="t4", keep_delta=False)
    assert_serves(dropped, delta.materialize(base, "t4"))
    assert (base_dir / "model.safetensors").read_bytes() == base_bytes


def test_plain_merge_weights_are_computed_at_the_first_switch(llama_v1, monkeypatch):
    """Format 1: loading allocates the served weights only; the plain-merge copy that switches select from comes with
    the first switch (not with a switch refused before it starts), once."""
    from hf_sift import served_weights

    artifact, _, delta, base = llama_v1
    allocated: list[int] = []
    allocate = served_weights.empty_tensors

    def counting(specs):
        allocated.append(sum(torch.Size(shape).numel() for shape, _ in specs))
        return allocate(specs)

    monkeypatch.setattr(served_weights, "empty_tensors", counting)
    tuned = sum(base[n].numel() for n in delta.names)
    model = MergedMaskedModel.from_pretrained(artifact, task="t1")
    assert allocated == [tuned]
    with pytest.raises(UnknownTaskError):
        model.set_task("nope")
    assert allocated == [tuned]
    model.set_task("t2")
    assert allocated == [tuned, tuned]
    model.set_task("t3")
    model.set_task(None)
    assert allocated == [tuned, tuned]
    assert_serves(model, delta.materialize(base, None))


@pytest.mark.parametrize("keep_delta", [True, False])
def test_a_slow_base_digest_still_sees_theta0(llama, monkeypatch, keep_delta):
    """θ0's digest runs alongside serving; a slow hash must still see θ0, not served weights, in both modes."""
    import time

    from hf_sift import served_base

    artifact, _, delta, base = llama

    def slow_digest(tensors, names=None):
        time.sleep(0.3)
        return digest_tensors(tensors, names)

    monkeypatch.setattr(served_base, "digest_tensors", slow_digest)
    model = MergedMaskedModel.from_pretrained(artifact, task="t2", keep_delta=keep_delta)
    assert_serves(model, delta.materialize(base, "t2"))


# ---------------------------------------------------------------------- command line


def test_cli_export_matches_the_api(llama, tmp_path, capsys):
    from hf_sift.cli import main

    artifact, _, delta, base = llama
    assert main(["export", str(artifact), "--task", "t3", "-o", str(tmp_path / "cli")]) == 0
    assert "t3" in capsys.readouterr().out
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "cli")
    assert_serves(vanilla_as_served(vanilla), delta.materialize(base, "t3"))
    assert json.loads((tmp_path / "cli" / EXPORT_RECORD_NAME).read_text())["task"] == "t3"
    assert main(["export", str(artifact), "-o", str(tmp_path / "plain"), "--dtype", "bfloat16"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert plain.dtype == torch.bfloat16
    api = MergedMaskedModel.from_pretrained(artifact, dtype=torch.bfloat16)
    assert_serves(vanilla_as_served(plain), api.model.state_dict())
    capsys.readouterr()
    assert main(["export", str(artifact), "--task", "nope", "-o", str(tmp_path / "bad")]) == 2  # UnknownTaskError
    assert "hf-sift: error: unknown task 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_export_device_map_and_model_kwargs(llama, tmp_path, capsys):
    from hf_sift.cli import main

    artifact, _, delta, base = llama
    out = tmp_path / "offloaded"
    args = ["export", str(artifact), "--task", "t4", "-o", str(out), "--device-map", json.dumps(DISK_OFFLOAD)]
    assert main([*args, "--model-kwargs", '{"attn_implementation": "eager"}']) == 0
    assert_serves(vanilla_as_served(AutoModelForCausalLM.from_pretrained(out)), delta.materialize(base, "t4"))
    assert main(["export", str(artifact), "-o", str(tmp_path / "cpu"), "--device-map", "cpu"]) == 0
    assert_serves(
        vanilla_as_served(AutoModelForCausalLM.from_pretrained(tmp_path / "cpu")), delta.materialize(base, None)
    )
    for flag, value, message in (
        ("--model-kwargs", "{not json", "not valid JSON"),
        ("--model-kwargs", "[1]", "expected a JSON object"),
        ("--device-map", "{", "not valid JSON"),
    ):
        assert main(["export", str(artifact), "-o", str(tmp_path / "bad"), flag, value]) == 2
        assert message in capsys.readouterr().err
    reserved = '{"trust_remote_code": true}'
    assert main(["export", str(artifact), "-o", str(tmp_path / "bad"), "--model-kwargs", reserved]) == 2
    assert "model_kwargs cannot set ['trust_remote_code']" in capsys.readouterr().err  # ReservedArgumentError
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scales_are_refused(llama, tmp_path, scale, capsys):
    from hf_sift.cli import main

    artifact, _, delta, base = llama
    with pytest.raises(InvalidScaleError, match="finite"):
        MergedMaskedModel.from_pretrained(artifact, task="t1", scale=scale)
    with pytest.raises(InvalidScaleError, match="finite"):
        delta.materialize(base, task="t1", scale=scale)
    capsys.readouterr()
    assert main(["export", str(artifact), "--task", "t1", "-o", str(tmp_path / "nan"), f"--scale={scale}"]) == 2
    assert "hf-sift: error: scale must be a finite number" in capsys.readouterr().err  # InvalidScaleError
    assert not (tmp_path / "nan").exists()
    with pytest.raises(InvalidScaleError):
        MergedMaskedModel.from_pretrained(artifact, task="t1", scale="0.5")


def test_push_to_hub_is_refused_not_forwarded(llama, monkeypatch):
    artifact, _, _, _ = llama
    model = MergedMaskedModel.from_pretrained(artifact, task="t1")
    pushed = []
    monkeypatch.setattr(type(model.model), "push_to_hub", lambda *a, **k: pushed.append(a), raising=False)
    with pytest.raises(UnsupportedHubPushError, match="hf-sift push"):
        model.push_to_hub("me/merged")
    assert pushed == []


def test_one_default_shard_size_everywhere(llama, tmp_path, monkeypatch):
    import inspect

    from hf_sift.cli import build_parser
    from hf_sift.merging import merge_checkpoints
    from hf_sift.shard_size import DEFAULT_MAX_SHARD_SIZE

    export = build_parser("export").parse_args(["export", "art", "-o", "out"])
    merge = build_parser("merge").parse_args(["merge", "--method", "soup", "--base", "b", "m", "-o", "out"])
    assert export.max_shard_size == merge.max_shard_size == DEFAULT_MAX_SHARD_SIZE
    for function in (merge_checkpoints, MergedDelta.save_pretrained):
        assert inspect.signature(function).parameters["max_shard_size"].default == DEFAULT_MAX_SHARD_SIZE
    artifact, _, _, _ = llama
    model = MergedMaskedModel.from_pretrained(artifact, task="t1")
    seen = {}
    monkeypatch.setattr(type(model.model), "save_pretrained", lambda self, folder, **kw: seen.update(kw))
    model.save_pretrained(tmp_path / "export")
    assert seen["max_shard_size"] == DEFAULT_MAX_SHARD_SIZE


def test_base_asking_for_custom_code_is_refused_and_nothing_runs(llama, tmp_path):
    from hf_sift.merging.negmerge_driver import negmerge_unlearn
    from hf_sift.remote_code import refuse_remote_code

    artifact, base_dir, _, _ = llama
    evil = tmp_path / "evil"
    shutil.copytree(base_dir, evil)
    marker = tmp_path / "code-ran"
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps(config))
    with pytest.raises(RemoteCodeError, match="auto_map"):
        MergedMaskedModel.from_pretrained(artifact, task="t1", base_model=evil)
    with pytest.raises(RemoteCodeError, match="custom code"):
        negmerge_unlearn(str(evil), None, None, grid={"learning_rate": [1e-5]})
    with pytest.raises(RemoteCodeError):
        refuse_remote_code(evil)
    assert not marker.exists()
    refuse_remote_code(base_dir)  # a plain config passes

"""SIFTTrainer: the sign constraint after every optimizer step, frozen parameters, determinism, resume, peft."""

from __future__ import annotations

import pytest
import torch
from trainer_fixtures import free_port, set_distributed_env, sift_args, task_dataset, tiny_model
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from hf_sift import SignVector, TaskVector
from hf_sift.errors import SignSeedMismatchError
from hf_sift.trainer import SIFTConfig, SIFTTrainer
from hf_sift.trainer.sign_constraint import REFERENCE_NAME, MissingReferenceError


class SignCheck(TrainerCallback):
    """Records min over tuned elements of v * (θ - θ0) after every optimizer step (at step end, before the next
    forward), against its own copy of θ0 and its own sign vector."""

    def __init__(self, model, names, sign_seed):
        params = dict(model.named_parameters())
        self.params = {n: params[n] for n in names}
        self.theta0 = {n: p.detach().clone() for n, p in self.params.items()}
        signs = SignVector(sign_seed)
        self.v = {n: signs.for_parameter(n, p.shape, dtype=p.dtype) for n, p in self.params.items()}
        self.minima: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        with torch.no_grad():
            self.minima.append(min(float((self.v[n] * (p - self.theta0[n])).min()) for n, p in self.params.items()))


def train_one(tmp_path, task_id="t0", model=None, callbacks_for=None, **overrides):
    model = model if model is not None else tiny_model()
    data = task_dataset()
    data = data.select([i for i, t in enumerate(data["task"]) if t == task_id])
    trainer = SIFTTrainer(model=model, args=sift_args(tmp_path, task_id=task_id, **overrides), train_dataset=data)
    extra = callbacks_for(trainer) if callbacks_for else None
    if extra is not None:
        trainer.add_callback(extra)
    trainer.train()
    return trainer, extra


def test_sign_constraint_holds_after_every_step_and_frozen_parameters_are_untouched(tmp_path):
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trainer, check = train_one(
        tmp_path, model=model, callbacks_for=lambda t: SignCheck(model, t.tuned_parameter_names, 7), max_steps=4
    )
    assert len(check.minima) == 4 and min(check.minima) >= 0.0
    names = trainer.tuned_parameter_names
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names
    state = model.state_dict()
    for name, tensor in base.items():
        if name not in names:
            assert torch.equal(state[name], tensor), name
    assert any(not torch.equal(state[n], base[n]) for n in names)
    # the task vector is the exact one of the foundation, and the constraint shows in it
    task_vector = trainer.task_vector()
    reference = TaskVector.from_state_dicts(base, state, 7, names)
    assert task_vector.digest == reference.digest and task_vector.base_digest == reference.base_digest
    for name in names:
        assert torch.equal(task_vector.packed_masks[name], reference.packed_masks[name])


def test_plain_trainer_would_break_the_constraint(tmp_path):
    """The check above can fail: unconstrained training moves elements against v."""
    model = tiny_model()
    names = SIFTTrainer(model=tiny_model(), args=sift_args(tmp_path)).tuned_parameter_names
    check = SignCheck(model, names, 7)
    data = task_dataset().select(range(8))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to="none",
        use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[check]).train()
    assert min(check.minima) < 0.0


def test_retraining_gives_the_same_digest_and_tasks_differ(tmp_path):
    first = train_one(tmp_path / "a")[0].task_vector()
    second = train_one(tmp_path / "b")[0].task_vector()
    other = train_one(tmp_path / "c", task_id="t1")[0].task_vector()
    assert first.digest == second.digest
    assert first.metadata == second.metadata
    assert other.digest != first.digest
    assert first.base_digest == other.base_digest


def test_without_a_task_id_the_data_is_identified_by_its_fingerprint(tmp_path):
    """No recipe is recorded without a task id; the `datasets` fingerprint is then the only record of the data."""
    data = task_dataset().select(range(8))
    trainer = SIFTTrainer(model=tiny_model(), args=sift_args(tmp_path, max_steps=1), train_dataset=data)
    trainer.train()
    metadata = trainer.task_vector().metadata
    assert metadata["data_fingerprint"] == data._fingerprint and "recipe" not in metadata


def test_projection_runs_on_real_optimizer_steps_only_with_gradient_accumulation(tmp_path):
    calls = []

    def counting(trainer):
        class Count(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                project = trainer.sign_constraint.project_
                trainer.sign_constraint.project_ = lambda: (calls.append(state.global_step), project())[1]

        return Count()

    model = tiny_model()
    trainer, _ = train_one(
        tmp_path, model=model, callbacks_for=counting, gradient_accumulation_steps=2, per_device_train_batch_size=2
    )
    assert calls == [0, 1, 2] and trainer.state.global_step == 3
    assert trainer.sign_constraint.violations() == 0
    again = train_one(tmp_path / "again", gradient_accumulation_steps=2, per_device_train_batch_size=2)[0]
    assert again.task_vector().digest == trainer.task_vector().digest


@pytest.mark.parametrize("weights_bf16", [False, True])
def test_bf16(tmp_path, weights_bf16):
    model = tiny_model()
    if weights_bf16:
        model = model.to(torch.bfloat16)
    trainer, check = train_one(
        tmp_path, model=model, callbacks_for=lambda t: SignCheck(model, t.tuned_parameter_names, 7), bf16=True
    )
    assert min(check.minima) >= 0.0
    task_vector = trainer.task_vector()
    assert task_vector.metadata["recipe"]["training_arguments"]["bf16"] is True
    dtype = torch.bfloat16 if weights_bf16 else torch.float32
    assert all(trainer.sign_constraint.theta0(n).dtype == dtype for n in trainer.tuned_parameter_names)
    assert train_one(tmp_path / "again", model=tiny_model().to(dtype), bf16=True)[0].task_vector().digest == (
        task_vector.digest
    )


def test_resume_gives_the_same_task_vector(tmp_path):
    whole = train_one(tmp_path / "whole", max_steps=6)[0].task_vector()
    train_one(tmp_path / "cut", max_steps=6, save_strategy="steps", save_steps=3)
    checkpoint = tmp_path / "cut" / "checkpoint-3"
    assert (checkpoint / REFERENCE_NAME).is_file()
    data = task_dataset()
    data = data.select([i for i, t in enumerate(data["task"]) if t == "t0"])
    resumed = SIFTTrainer(
        model=tiny_model(), args=sift_args(tmp_path / "cut", task_id="t0", max_steps=6), train_dataset=data
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.task_vector().digest == whole.digest
    wrong_seed = SIFTTrainer(
        model=tiny_model(),
        args=sift_args(tmp_path / "cut", task_id="t0", max_steps=6, sign_seed=8),
        train_dataset=data,
    )
    with pytest.raises(SignSeedMismatchError):
        wrong_seed.train(resume_from_checkpoint=str(checkpoint))
    (checkpoint / REFERENCE_NAME).unlink()
    with pytest.raises(MissingReferenceError):
        resumed.train(resume_from_checkpoint=str(checkpoint))


def test_peft_lora_constrains_the_adapter(tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    vectors = []
    for run in ("a", "b"):
        model = tiny_model()
        base = {k: v.clone() for k, v in model.state_dict().items()}
        data = task_dataset().select(range(0, 24, 3))
        trainer = SIFTTrainer(
            model=model, args=sift_args(tmp_path / run, task_id="t0"), train_dataset=data, peft_config=lora
        )
        check = SignCheck(trainer.model, trainer.tuned_parameter_names, 7)
        trainer.add_callback(check)
        trainer.train()
        assert min(check.minima) >= 0.0
        names = trainer.tuned_parameter_names
        assert names and all("lora_" in n for n in names)
        after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
        assert set(after) == set(base)
        for name, tensor in base.items():  # the base weights are untouched
            assert torch.equal(after[name], tensor), name
        vectors.append(trainer.task_vector())
    assert set(vectors[0].q) == set(names)
    assert vectors[0].base_digest == vectors[1].base_digest  # same adapter initialisation for every task
    assert vectors[0].digest == vectors[1].digest
    assert any(int(q.abs().max()) > 0 for q in vectors[0].q.values())


def test_plain_training_arguments_are_upgraded_and_fields_are_cli_flags(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-3, report_to="none", use_cpu=True)
    trainer = SIFTTrainer(model=tiny_model(), args=args)
    assert isinstance(trainer.args, SIFTConfig)
    assert trainer.args.learning_rate == 3e-3 and trainer.args.sign_seed == 0
    (parsed,) = HfArgumentParser(SIFTConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--sign_seed", "5", "--include_parameters", "q_proj", "v_proj",
         "--exclude_parameters", "layers\\.1\\.", "--task_id", "alice", "--use_cpu", "true"]
    )  # fmt: skip
    assert parsed.sign_seed == 5 and parsed.task_id == "alice"
    trainer = SIFTTrainer(model=tiny_model(), args=parsed)
    assert trainer.tuned_parameter_names == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
    ]
    assert not trainer.model.model.layers[1].self_attn.q_proj.weight.requires_grad
    for flag in ("--sign_seed", "--include_parameters", "--exclude_parameters", "--default_exclude", "--task_id"):
        assert flag in HfArgumentParser(SIFTConfig).format_help()


def test_task_seed_depends_on_the_task(tmp_path):
    args = sift_args(tmp_path, seed=3)
    assert args.for_task("a").task_seed == args.for_task("a").task_seed
    assert args.for_task("a").task_seed != args.for_task("b").task_seed
    assert args.task_seed == 3
    with pytest.raises(ValueError):
        sift_args(tmp_path, task_id="../x")
    with pytest.raises(ValueError):
        sift_args(tmp_path, include_parameters=["("])


def _ddp_rank(rank: int, world_size: int, port: int, folder: str) -> None:
    set_distributed_env(rank, world_size, port)
    try:
        model = tiny_model()
        data = task_dataset().select(range(16))
        args = sift_args(folder, per_device_train_batch_size=2, max_steps=3)
        trainer = SIFTTrainer(model=model, args=args, train_dataset=data)
        assert trainer.args.world_size == world_size
        check = SignCheck(model, trainer.tuned_parameter_names, 7)
        trainer.add_callback(check)
        trainer.train()
        assert len(check.minima) == 3 and min(check.minima) >= 0.0
        with open(f"{folder}/digest-{rank}", "w") as f:
            f.write(trainer.task_vector().digest)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_data_parallel_training_keeps_the_constraint_and_ranks_agree(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    digests = {(tmp_path / f"digest-{r}").read_text() for r in range(2)}
    assert len(digests) == 1

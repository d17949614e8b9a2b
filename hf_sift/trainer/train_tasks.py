"""train_tasks: one SIFT run per task of a dataset, accumulated into a MergedDelta that is saved after every task."""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import SaveStrategy

from ..artifact import CONFIG_NAME
from ..digest import state_dict_digest
from ..errors import BaseModelMismatchError, InvalidArgumentError, ParameterMismatchError, SignSeedMismatchError
from ..merged_delta import MergedDelta
from ..task_id import validate_task_id
from .sift_config import SIFTConfig
from .sift_trainer import SIFTTrainer, freeze_all_but, select_tuned_names
from .sign_constraint import SignConstraint, tuned_parameters
from .task_sharding import (
    ProcessLayout,
    all_reduce_sum,
    cpu_process_group,
    gather_to_main,
    rank_local_training,
)


logger = logging.getLogger(__name__)


def group_tasks(dataset: Any, task_column: str, tasks: Sequence[str] | None = None) -> dict[str, list[int]]:
    """Row indices of each task of `dataset` (sorted task ids; rows in dataset order)."""
    if task_column not in dataset.column_names:
        raise ParameterMismatchError(f"the dataset has no task column {task_column!r}: {dataset.column_names}")
    groups: dict[str, list[int]] = {}
    for index, value in enumerate(dataset[task_column]):
        groups.setdefault(validate_task_id(value), []).append(index)
    if tasks is not None:
        wanted = [validate_task_id(t) for t in tasks]
        unknown = sorted(set(wanted) - set(groups))
        if unknown:
            raise ParameterMismatchError(f"task(s) {unknown[:3]} have no example in the dataset")
        groups = {t: groups[t] for t in wanted}
    return dict(sorted(groups.items()))


def _partial_dir(output_dir: Path, layout: ProcessLayout) -> Path:
    return output_dir.parent / f".{output_dir.name}.rank{layout.rank}-of-{layout.world_size}"


def _check_resumable(delta: MergedDelta, fresh: MergedDelta, where: Path) -> None:
    if delta.sign_seed != fresh.sign_seed or delta.scale_bits != fresh.scale_bits:
        raise SignSeedMismatchError(f"{where} was trained with sign_seed={delta.sign_seed}, not {fresh.sign_seed}")
    if delta.shapes != fresh.shapes:
        raise ParameterMismatchError(f"{where} covers other tuned parameters than this run")
    if delta.base_digest != fresh.base_digest:
        raise BaseModelMismatchError(f"{where} was trained from another θ0 (base digest {delta.base_digest})")
    if (
        None not in (delta.base_model_digest, fresh.base_model_digest)
        and delta.base_model_digest != fresh.base_model_digest
    ):
        raise BaseModelMismatchError(f"{where} was trained from another base model (its embeddings or LM head differ)")


def _is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _load_or(directory: Path, fresh: MergedDelta) -> MergedDelta:
    if not (directory / CONFIG_NAME).is_file():
        return fresh
    delta = MergedDelta.from_pretrained(directory)
    _check_resumable(delta, fresh, directory)
    return delta


def train_tasks(
    model: torch.nn.Module,
    dataset: Any,
    task_column: str = "task",
    args: TrainingArguments | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    tasks: Sequence[str] | None = None,
    peft_config: Any = None,
    data_collator: Any = None,
    processing_class: Any = None,
    callbacks: list[TrainerCallback] | None = None,
    base_model: str | None = None,
    base_revision: str | None = None,
) -> MergedDelta | None:
    """Train one SIFT task vector per task of `dataset` and merge them into the artifact at `output_dir`.

    θ0 is the model's tuned parameters at call time. Each task gets a fresh [`SIFTTrainer`] (fresh optimizer,
    scheduler and RNG state, seeded from `(args.seed, task_id)`) on the rows of its task, then the model is reset to
    θ0 in place. After each task the artifact is saved atomically, so a crash loses at most the task in flight; a
    restarted call skips the tasks already recorded and ends with the same bytes. Each save is a compare-and-swap
    ([`~hf_sift.MergedDelta.save_pretrained`]): if another process saved the artifact meanwhile, the run stops with
    [`~hf_sift.errors.ConcurrentUpdateError`] and a new call resumes from the artifact as that process left it.

    Under `accelerate launch` (or `torchrun`) with N processes, the tasks are sharded over the ranks, each rank
    trains its tasks alone into a partial artifact next to `output_dir`, and at the end the int64 partial sums are
    all-reduced and rank 0 writes the same bytes a single process would.

    Args:
        model (`PreTrainedModel` or `PeftModel`): The base model, modified in place during training and left at θ0.
        dataset (`datasets.Dataset`): Tokenized examples of every task, with a task column.
        task_column (`str`, *optional*, defaults to `"task"`): Column holding each example's task id.
        args (`SIFTConfig` or `TrainingArguments`, *optional*): Shared by every task (`task_id` is set per task;
            checkpointing inside a task is turned off).
        output_dir (`str` or `os.PathLike`): Where the merged artifact is written.
        tasks (`list[str]`, *optional*): Train only these tasks (default: every task of the dataset).
        peft_config (`peft.PeftConfig`, *optional*): Wrap `model` once with this adapter, its initialisation seeded
            with `args.seed`, so that every task starts from the same adapter; the task vectors cover the adapter.
        data_collator, processing_class, callbacks: Passed to every [`SIFTTrainer`].
        base_model (`str`, *optional*): Recorded in the artifact; defaults to the model's `name_or_path`.
        base_revision (`str`, *optional*): Recorded in the artifact.

    Returns:
        [`~hf_sift.MergedDelta`]: The merge of every task (on rank 0; None on the other ranks).
    """
    if output_dir is None:
        raise InvalidArgumentError("train_tasks needs an `output_dir` for the merged artifact")
    output_dir = Path(output_dir).absolute()
    if args is None:
        args = SIFTConfig(output_dir=str(output_dir.parent / f"{output_dir.name}-runs"), report_to="none")
    args = SIFTConfig.from_training_arguments(args)
    layout = ProcessLayout.from_environment()
    groups = group_tasks(dataset, task_column, tasks)

    # θ0 of the whole model (embeddings and LM head too, which shape training), recorded so that serving and a
    # replay can check the base; an already wrapped PEFT model has no plain base state dict to record.
    base_model_digest = None if _is_peft_model(model) else state_dict_digest(model.state_dict())
    if peft_config is not None:
        from peft import get_peft_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = get_peft_model(model, peft_config)
    names = select_tuned_names(model, args.selection())
    freeze_all_but(model, names)
    constraint = SignConstraint.snapshot(tuned_parameters(model, names), args.sign_seed)
    theta0 = constraint.reference_state_dict()
    selection = args.selection()
    if base_model is None:
        base_model = getattr(getattr(model, "config", None), "name_or_path", None) or None
    fresh = MergedDelta(
        theta0,
        args.sign_seed,
        selection if selection.resolve(theta0) == names else names,
        base_model=base_model,
        base_revision=base_revision,
        base_model_digest=base_model_digest,
    )
    constraint.base_digest = fresh.base_digest  # the same θ0 and names: hash it once
    del theta0

    final = _load_or(output_dir, fresh)
    pending = [t for t in groups if t not in final]
    group = None
    if layout.is_distributed:
        group = cpu_process_group(layout)
        # Rank 0's view of the finished tasks decides the sharding (output_dir may not be shared between nodes).
        shared = [final.task_ids]
        torch.distributed.broadcast_object_list(shared, src=0, group=group)
        finished = set(shared[0])
        pending = [t for t in groups if t not in finished]
        partial_dir = _partial_dir(output_dir, layout)
        partial = _load_or(partial_dir, copy.deepcopy(fresh))
        if finished & set(partial.task_ids):  # already folded into the final artifact by a previous run
            shutil.rmtree(partial_dir)
            partial = copy.deepcopy(fresh)
        target_dir, delta = partial_dir, partial
        mine = layout.shard(pending)
    else:
        target_dir, delta, mine = output_dir, final, pending
    del fresh

    todo = [t for t in mine if t not in delta]
    device = layout.device(args.use_cpu)
    bar = tqdm(todo, desc="tasks", unit="task", disable=args.disable_tqdm or not todo, position=0)
    for task_id in bar:
        started = time.perf_counter()
        subset = dataset.select(groups[task_id])
        task_args = args.for_task(
            task_id, reset_devices=layout.is_distributed, save_strategy=SaveStrategy.NO, output_dir=args.output_dir
        )
        with rank_local_training(device) if layout.is_distributed else contextlib.nullcontext():
            _ = task_args.device  # set up the (rank-local) devices before the Trainer builds its Accelerator
            trainer = SIFTTrainer(
                model,
                task_args,
                data_collator=data_collator,
                train_dataset=subset,
                processing_class=processing_class,
                callbacks=callbacks,
                sign_constraint=constraint,
            )
            output = trainer.train()
            trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        task_vector = trainer.task_vector({"train_loss": output.training_loss})
        delta.add(task_id, task_vector)
        del task_vector
        delta.save_pretrained(target_dir)
        constraint.reset_()
        trainer.accelerator.free_memory()
        del trainer
        gc.collect()
        elapsed = time.perf_counter() - started
        bar.set_postfix(task=task_id, loss=f"{output.training_loss:.4f}")
        logger.info("task %s: loss %.6f, %.1f s", task_id, output.training_loss, elapsed)

    if not layout.is_distributed:
        return final
    return _fold_partials(final, delta, layout, group, output_dir, target_dir)


def _fold_partials(
    final: MergedDelta, partial: MergedDelta, layout: ProcessLayout, group: Any, output_dir: Path, partial_dir: Path
) -> MergedDelta | None:
    """All-reduce the partial sums, gather the records and masks on rank 0, and write the final artifact there."""
    import torch.distributed as dist

    total = all_reduce_sum(partial.sum, group)
    payload = {t: (partial.record(t), partial.load_mask(t)) for t in partial.task_ids}
    gathered = gather_to_main(payload, layout, group)
    if layout.is_main:
        records, masks = {}, {}
        for part in gathered:
            for task_id, (record, mask) in part.items():
                records[task_id], masks[task_id] = record, mask
        if records:
            final.absorb(total, records, masks)
            final.save_pretrained(output_dir)
    dist.barrier(group=group)
    if partial_dir.exists():
        shutil.rmtree(partial_dir)
    return final if layout.is_main else None

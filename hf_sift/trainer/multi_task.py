"""train_tasks: one SIFT run per task of a dataset, accumulated into a MergedDelta that is saved after every task."""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import SaveStrategy

from ..artifact import CONFIG_NAME
from ..compatibility import Compatibility, check_compatible
from ..digest import state_dict_digest
from ..errors import InvalidArgumentError, MixedRecipeError, ParameterMismatchError
from ..merged_delta import MergedDelta
from ..peft_plain_merge import is_peft_model
from ..task_id import validate_task_id
from ..task_vector import TaskVector
from .recipe import Recipe, rows_digest
from .saved_tokenizer import save_processing_class
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


def _load_or(directory: Path, fresh: MergedDelta) -> MergedDelta:
    if not (directory / CONFIG_NAME).is_file():
        return fresh
    delta = MergedDelta.from_pretrained(directory)
    check_compatible(fresh, delta, str(directory))
    return delta


def prepare_base(
    model: torch.nn.Module,
    args: SIFTConfig,
    *,
    peft_config: Any = None,
    base_model: str | None = None,
    base_revision: str | None = None,
) -> tuple[torch.nn.Module, SignConstraint, MergedDelta]:
    """Set up θ0 for training tasks: wrap with peft, freeze all but the tuned parameters, snapshot the constraint.

    Returns the (possibly wrapped) model, the [`SignConstraint`] every task shares and an empty [`MergedDelta`]
    over the same θ0, sign seed and tuned parameters.
    """
    # θ0 of the whole model (embeddings and LM head too, which shape training), recorded so that serving and a
    # replay can check the base; an already wrapped PEFT model has no plain base state dict to record.
    base_model_digest = None if is_peft_model(model) else state_dict_digest(model.state_dict())
    if peft_config is not None:
        from peft import get_peft_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = get_peft_model(model, peft_config)
    selection = args.selection()
    names = select_tuned_names(model, selection)
    freeze_all_but(model, names)
    constraint = SignConstraint.snapshot(tuned_parameters(model, names), args.sign_seed)
    theta0 = constraint.reference_state_dict()
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
    return model, constraint, fresh


def train_task(
    model: torch.nn.Module,
    dataset: Any,
    task_id: str,
    args: SIFTConfig,
    constraint: SignConstraint,
    *,
    data_collator: Any = None,
    processing_class: Any = None,
    callbacks: list[TrainerCallback] | None = None,
    layout: ProcessLayout | None = None,
) -> TaskVector:
    """Train one task from θ0 and return its [`~hf_sift.TaskVector`]; the model is reset to θ0 in place after.

    This is the one code path every task of [`train_tasks`] goes through, and the one an unlearning replay uses.

    Args:
        model: The model [`prepare_base`] returned.
        dataset (`datasets.Dataset`): The task's rows, in order.
        task_id (`str`): The task; its seeds derive from `(args.seed, task_id)`.
        args (`SIFTConfig`): The run's arguments (`task_id` is set here; checkpointing is turned off).
        constraint (`SignConstraint`): The shared constraint of [`prepare_base`].
        data_collator, processing_class, callbacks: Passed to the [`SIFTTrainer`].
        layout (`ProcessLayout`, *optional*): This process among the launch's (trains rank-local when several).
    """
    layout = layout or ProcessLayout()
    task_args = args.for_task(
        task_id, reset_devices=layout.is_distributed, save_strategy=SaveStrategy.NO, output_dir=args.output_dir
    )
    device = layout.device(args.use_cpu)
    with rank_local_training(device) if layout.is_distributed else contextlib.nullcontext():
        _ = task_args.device  # set up the (rank-local) devices before the Trainer builds its Accelerator
        trainer = SIFTTrainer(
            model,
            task_args,
            data_collator=data_collator,
            train_dataset=dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            sign_constraint=constraint,
        )
        try:
            output = trainer.train()
            trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
            task_vector = trainer.task_vector({"train_loss": output.training_loss})
        finally:
            constraint.reset_()
            trainer.accelerator.free_memory()
    del trainer
    gc.collect()
    return task_vector


def check_recipes(
    delta: MergedDelta,
    groups: dict[str, list[int]],
    dataset: Any,
    capture: Callable[[int], Recipe],
) -> None:
    """Raise [`~hf_sift.errors.MixedRecipeError`] where this run's recipe differs from a merged task's record.

    `capture(version)` gives this run's recipe (arguments, collator, tokenizer and adapter; no rows) at a recipe
    version: each task's record is compared with the run's recipe at the record's version, and its rows in `dataset`
    (by `groups`) with the recorded ones, hashed likewise. Tasks recorded without a recipe are skipped.
    """
    runs: dict[int, Recipe] = {}
    for task_id in delta.task_ids:
        recorded = delta.record(task_id).get("metadata", {}).get("recipe")
        if recorded is None:
            continue
        recorded = Recipe.from_dict(recorded)
        if recorded.version not in runs:
            runs[recorded.version] = capture(recorded.version)
        problems = recorded.differences(runs[recorded.version])
        if task_id in groups:
            subset = dataset.select(groups[task_id])
            rows = {"count": len(subset), "digest": rows_digest(subset, version=recorded.version)}
            if rows != recorded.rows:
                problems.append(
                    f"rows of {task_id!r}: recorded {recorded.rows['count']} ({recorded.rows['digest'][:19]}…), "
                    f"now {rows['count']} ({rows['digest'][:19]}…)"
                )
        if problems:
            raise MixedRecipeError(
                f"task {task_id!r} of the artifact was trained with another recipe than this run: "
                + "; ".join(problems)
                + ". Pass allow_mixed_recipes=True to merge tasks trained differently (each replays with its own)."
            )


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
    task_vector_store: str | os.PathLike | None = None,
    on_task_vector: Callable[[str, TaskVector], None] | None = None,
    allow_mixed_recipes: bool = False,
) -> MergedDelta | None:
    """Train one SIFT task vector per task of `dataset` and merge them into the artifact at `output_dir`.

    θ0 is the model's tuned parameters at call time. Each task gets a fresh [`SIFTTrainer`] (fresh optimizer,
    scheduler and RNG state, seeded from `(args.seed, task_id)`) on the rows of its task, then the model is reset to
    θ0 in place. After each task the artifact is saved atomically, so a crash loses at most the task in flight; a
    restarted call skips the tasks already recorded and ends with the same bytes. A restart whose recipe (training
    arguments, a finished task's rows, collator, tokenizer, adapter) differs from the recorded one is refused. Each
    save is a compare-and-swap ([`~hf_sift.MergedDelta.save_pretrained`]): if another process saved the artifact
    meanwhile, the run stops with [`~hf_sift.errors.ConcurrentUpdateError`] and a new call resumes from the artifact
    as that process left it.

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
        data_collator, processing_class, callbacks: Passed to every [`SIFTTrainer`]. The tokenizer (or processor)
            `processing_class` is also saved into `output_dir` (on the main process, before the first task), so that
            the artifact carries it: a push uploads it and `AutoTokenizer.from_pretrained(output_dir)` loads it.
        base_model (`str`, *optional*): Recorded in the artifact; defaults to the model's `name_or_path`.
        base_revision (`str`, *optional*): Recorded in the artifact. For a base loaded from the Hub, pass the commit
            it was loaded at (e.g. `huggingface_hub.resolve_revision(name).resolved`, loading with that revision);
            `hf-sift train` does. Otherwise [`~hf_sift.hub.push_to_hub`] pins the Hub head after checking its
            weights against the recorded digests.
        task_vector_store (`str` or `os.PathLike`, *optional*): A private folder (never published) where each
            task's exact task vector is kept, so that [`~hf_sift.unlearn`] can remove it later without a replay.
        on_task_vector (`Callable[[str, TaskVector], None]`, *optional*): Called with each trained task's id and
            [`~hf_sift.TaskVector`], before it is merged.
        allow_mixed_recipes (`bool`, *optional*, defaults to `False`): Continue an artifact whose tasks were trained
            with another recipe; each task's record keeps its own, which its replay uses.

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
    every_group = group_tasks(dataset, task_column)
    groups = group_tasks(dataset, task_column, tasks)

    model, constraint, fresh = prepare_base(
        model, args, peft_config=peft_config, base_model=base_model, base_revision=base_revision
    )
    final = _load_or(output_dir, fresh)
    if final.num_tasks and not allow_mixed_recipes:

        def capture(version: int) -> Recipe:
            return Recipe.capture(
                args, "", model=model, data_collator=data_collator, processing_class=processing_class, version=version
            )

        check_recipes(final, every_group, dataset, capture)
    if layout.is_main:
        save_processing_class(processing_class, output_dir)
    store = None
    if task_vector_store is not None:
        from ..task_vector_store import TaskVectorStore

        store = TaskVectorStore(task_vector_store)
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

    # A rank's partial artifact holds its sum only (the plain merge P is written once, into the final artifact);
    # an adapter's θ0 is in no file, so the wrapped model (back at θ0 after each task) is the base P is written from.
    save_kwargs = {"base": None} if layout.is_distributed else {"base": model} if is_peft_model(model) else {}
    todo = [t for t in mine if t not in delta]
    bar = tqdm(todo, desc="tasks", unit="task", disable=args.disable_tqdm or not todo, position=0)
    for task_id in bar:
        started = time.perf_counter()
        task_vector = train_task(
            model,
            dataset.select(groups[task_id]),
            task_id,
            args,
            constraint,
            data_collator=data_collator,
            processing_class=processing_class,
            callbacks=callbacks,
            layout=layout,
        )
        if on_task_vector is not None:
            on_task_vector(task_id, task_vector)
        loss = task_vector.metadata["train_loss"]
        delta.add(task_id, task_vector)
        if store is not None:
            store.put(task_id, task_vector, record=delta.record(task_id))
        del task_vector
        delta.save_pretrained(target_dir, **save_kwargs)
        elapsed = time.perf_counter() - started
        bar.set_postfix(task=task_id, loss=f"{loss:.4f}")
        logger.info("task %s: loss %.6f, %.1f s", task_id, loss, elapsed)

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
    gathered = gather_to_main((Compatibility.of(partial), payload), layout, group)
    if layout.is_main:
        records, masks = {}, {}
        for rank, (compatibility, part) in enumerate(gathered):
            check_compatible(final, compatibility, f"rank {rank}")
            for task_id, (record, mask) in part.items():
                records[task_id], masks[task_id] = record, mask
        if records:
            final.absorb(total, records, masks, source=partial)
            final.save_pretrained(output_dir)
    dist.barrier(group=group)
    if partial_dir.exists():
        shutil.rmtree(partial_dir)
    return final if layout.is_main else None

"""`hf_sift.unlearn`: remove tasks from a merged artifact exactly, as one checked call.

Each task is replayed through the very code path `train_tasks` trained it with (or read from a private task-vector
store), its digest is checked against the recorded one, every requested task is subtracted, and the artifact is
saved once, atomically, with one unlearning-log entry per task. Anything that would make the replay differ is
refused before training, and a replay that still differs is refused after it; the artifact is then unchanged.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .compatibility import check_compatible
from .errors import (
    EnvironmentMismatchError,
    InvalidArgumentError,
    ReplayPreconditionError,
    TaskDigestMismatchError,
)
from .masks import popcount
from .merged_delta import MergedDelta
from .peft_plain_merge import is_peft_model
from .plain_merge import RECORDED_BASE
from .task_id import validate_task_id
from .task_vector import TaskVector


@dataclass
class TaskRemoval:
    """How one task was removed (or, in a dry run, what removing it would cost).

    Args:
        task_id (`str`): The task.
        source (`str`): `"replay"` (its training replayed) or `"store"` (read from the task-vector store).
        replay_steps (`int`): Optimizer steps of the replay (0 from the store; the recorded steps in a dry run).
        wall_time_s (`float`): Seconds spent obtaining and checking its task vector.
        digest_before (`str`, *optional*): Digest of the sum before its removal (None in a dry run).
        digest_after (`str`, *optional*): Digest of the sum after it (None in a dry run).
    """

    task_id: str
    source: str
    replay_steps: int
    wall_time_s: float = 0.0
    digest_before: str | None = None
    digest_after: str | None = None


@dataclass
class UnlearningReport:
    """What [`unlearn`] did: the tasks removed, their cost and the sum's digests.

    Args:
        artifact (`str`): The artifact's folder.
        tasks (`list[TaskRemoval]`): One entry per requested task, in order.
        digest_before (`str`): Digest of the sum before unlearning.
        digest_after (`str`, *optional*): Digest of the sum saved after it (None in a dry run).
        wall_time_s (`float`): Seconds for the whole call.
        dry_run (`bool`): Whether only the checks ran.
    """

    artifact: str
    tasks: list[TaskRemoval] = field(default_factory=list)
    digest_before: str = ""
    digest_after: str | None = None
    wall_time_s: float = 0.0
    dry_run: bool = False

    @property
    def replay_steps(self) -> int:
        """Optimizer steps replayed (or, in a dry run, to replay) over every task."""
        return sum(t.replay_steps for t in self.tasks)

    def __str__(self) -> str:
        head = "dry run: would unlearn" if self.dry_run else "unlearned"
        lines = [f"{head} {len(self.tasks)} task(s) from {self.artifact} ({self.replay_steps} replay steps)"]
        for task in self.tasks:
            cost = f"{task.replay_steps} steps" if task.source == "replay" else "no training"
            timing = "" if self.dry_run else f", {task.wall_time_s:.2f} s"
            lines.append(f"  {task.task_id}: from the {task.source} ({cost}{timing})")
        lines.append(f"sum digest before: {self.digest_before}")
        if self.digest_after is not None:
            lines.append(f"sum digest after:  {self.digest_after}")
        lines.append(f"wall time: {self.wall_time_s:.2f} s")
        return "\n".join(lines)


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` torch threads (unchanged when None), then restore the previous count."""
    before = torch.get_num_threads()
    if count is not None and count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def describe_mismatch(delta: MergedDelta, task_id: str, replayed: TaskVector) -> str:
    """Which tensors of a replay differ from the merged task, as far as its recorded mask tells.

    The recorded mask is the sign agreement of the merged task vector; a tensor whose replayed mask differs
    differs for sure (how many mask bits differ is a lower bound of the elements that do).
    """
    recorded = delta.load_mask(task_id)
    changed = []
    for name in delta.names:
        bits = popcount(torch.bitwise_xor(recorded[name], replayed.packed_masks[name].to(recorded[name].device)))
        if bits:
            changed.append((name, bits, replayed.q[name].numel()))
    if not changed:
        return "the replayed masks equal the recorded ones: the values differ inside the mask"
    shown = ", ".join(
        f"{name} ({bits} of {numel} elements change side of the mask)" for name, bits, numel in changed[:5]
    )
    more = f", and {len(changed) - 5} more" if len(changed) > 5 else ""
    return f"{len(changed)} of {len(delta.names)} tensors differ: {shown}{more}"


def unlearn(
    artifact: str | os.PathLike,
    task_ids: str | Sequence[str],
    *,
    model: torch.nn.Module | None = None,
    dataset: Any = None,
    task_column: str = "task",
    args: Any = None,
    data_collator: Any = None,
    processing_class: Any = None,
    peft_config: Any = None,
    callbacks: list | None = None,
    task_vector_store: str | os.PathLike | None = None,
    redact: bool = False,
    salt: bytes | str | None = None,
    dry_run: bool = False,
    allow_environment_mismatch: bool = False,
    output_dir: str | os.PathLike | None = None,
    base: str | os.PathLike | None | object = RECORDED_BASE,
    revision: str | None = None,
    parent_commit: str | None = None,
    keep_history: bool = False,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> UnlearningReport:
    """Remove tasks from a merged artifact exactly: afterwards it is byte for byte a merge of the other tasks.

    1. Before any training, every task is checked: it is merged; its rows in `dataset` (every column, in order)
       equal the recorded ones; its recorded recipe rebuilds its training arguments; the collator, tokenizer and
       adapter given are the recorded ones; the environment matches the recorded one (the thread count is set to
       the recorded one for the replay). Anything else is refused and nothing is trained or changed.
    2. Each task's training is replayed through the code path [`~hf_sift.train_tasks`] uses (a task found in
       `task_vector_store` is read from there instead, with no training).
    3. A task vector whose digest differs from the recorded one is refused, naming the tensors that differ.
    4. Every task is subtracted and the artifact saved once, atomically (sum, masks, records and log).
    5. The unlearning log gets one entry per task (its id, or a salted hash with `redact`; the sum's digests
       before and after; the cost); never any data.

    Args:
        artifact (`str` or `os.PathLike`): The artifact's folder.
        task_ids (`str` or `list[str]`): The tasks to remove.
        model (`PreTrainedModel`, *optional*): The base model the artifact was trained from (modified in place
            while replaying, left at θ0; wrapped with `peft_config` when given). Needed unless every task is in
            the store.
        dataset (`datasets.Dataset`, *optional*): The training data, with the tasks' rows as they were trained.
        task_column (`str`, *optional*, defaults to `"task"`): Column holding each row's task id.
        args (`SIFTConfig` or `TrainingArguments`, *optional*): The arguments given to `train_tasks`, checked
            against each task's recorded ones (a difference is refused, naming it). By default each task replays
            with the arguments its recipe records.
        data_collator, processing_class, peft_config, callbacks: As given to `train_tasks`.
        task_vector_store (`str` or `os.PathLike`, *optional*): The private store `train_tasks` kept the task
            vectors in; tasks found there are removed without training.
        redact (`bool`, *optional*, defaults to `False`): Log only a salted hash of each task id.
        salt (`bytes` or `str`, *optional*): The redaction key (a random, forgotten one by default).
        dry_run (`bool`, *optional*, defaults to `False`): Only run the checks and report the replay's cost.
        allow_environment_mismatch (`bool`, *optional*, defaults to `False`): Replay even where the environment
            differs from the recorded one; the digest check still refuses a replay that differs.
        output_dir (`str` or `os.PathLike`, *optional*): The Trainer's working folder (a temporary one by default).
        base (`str` or `os.PathLike`, *optional*): The base model's folder or Hub name to write the plain merge P
            from, as for [`MergedDelta.save_pretrained`] (default: the recorded one, if found locally; `None`: no P).
        revision, parent_commit, keep_history, token, cache_dir: For a Hub repo id as `artifact` only: the branch
            (default `main`), the commit to start from (default: its head), whether to keep the branch's history
            rather than squash it, the Hub token and cache folder. See [`~hf_sift.hub.unlearn_repo`].

    Returns:
        [`UnlearningReport`] ([`~hf_sift.hub.HubUnlearningReport`] for a Hub repo id)

    Raises:
        [`~hf_sift.errors.UnknownTaskError`], [`~hf_sift.errors.ReplayPreconditionError`],
        [`~hf_sift.errors.EnvironmentMismatchError`], [`~hf_sift.errors.BaseModelMismatchError`] (before any
        training) or [`~hf_sift.errors.TaskDigestMismatchError`] (after a replay); the artifact is unchanged after
        any of them.
    """
    hub = {"revision": revision, "parent_commit": parent_commit, "token": token, "cache_dir": cache_dir}
    hub = {key: value for key, value in hub.items() if value is not None}
    from .hub.sources import could_be_repo_id

    if not Path(artifact).expanduser().exists() and could_be_repo_id(artifact):
        from .hub.unlearn import unlearn_repo

        replay = dict(model=model, dataset=dataset, task_column=task_column, args=args, data_collator=data_collator)
        replay.update(processing_class=processing_class, peft_config=peft_config, callbacks=callbacks)
        replay.update(task_vector_store=task_vector_store, redact=redact, salt=salt, dry_run=dry_run)
        replay.update(allow_environment_mismatch=allow_environment_mismatch, output_dir=output_dir, base=base)
        return unlearn_repo(str(artifact), task_ids, keep_history=keep_history, **hub, **replay)
    if hub or keep_history:
        raise InvalidArgumentError(f"{sorted(hub) or ['keep_history']} apply to a Hub repo id, not to a local folder")
    started = time.perf_counter()
    artifact = Path(artifact)
    requested = [validate_task_id(t) for t in ([task_ids] if isinstance(task_ids, str) else task_ids)]
    if not requested or len(set(requested)) != len(requested):
        raise ReplayPreconditionError(f"give each task to unlearn once, got {requested}")
    delta = MergedDelta.from_pretrained(artifact)
    records = {t: delta.record(t) for t in requested}  # UnknownTaskError for a task not merged
    report = UnlearningReport(artifact=str(artifact), digest_before=delta.digest, dry_run=dry_run)

    store = None
    if task_vector_store is not None:
        from .task_vector_store import TaskVectorStore

        store = TaskVectorStore(task_vector_store)
        for task_id in requested:
            kept = store.record(task_id) if task_id in store else None
            if kept is not None and kept.get("digest") != records[task_id]["digest"]:
                raise TaskDigestMismatchError(
                    f"the task-vector store holds another task vector for {task_id!r} (digest {kept.get('digest')}) "
                    f"than the one merged ({records[task_id]['digest']}); nothing was changed"
                )
    stored = [t for t in requested if store is not None and t in store]
    replays = [t for t in requested if t not in stored]
    with contextlib.ExitStack() as stack:
        if replays:
            if output_dir is None:
                output_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="hf_sift_replay_"))
            plan = _plan_replays(
                delta, replays, model, dataset, task_column, args, data_collator, processing_class, peft_config,
                allow_environment_mismatch, Path(output_dir),
            )  # fmt: skip
        digest = report.digest_before
        for task_id in requested:
            task_started = time.perf_counter()
            steps = int(records[task_id].get("metadata", {}).get("global_step", 0)) if task_id in replays else 0
            removal = TaskRemoval(task_id, "replay" if task_id in replays else "store", steps)
            report.tasks.append(removal)
            if dry_run:
                continue
            if task_id in stored:
                vector = store.get(task_id, expected_digest=records[task_id]["digest"])
            else:
                vector = plan.replay(task_id, callbacks)
                _check_replay(delta, task_id, vector)
            removal.wall_time_s = time.perf_counter() - task_started
            # Subtracted in memory at once (one task vector held at a time); nothing is saved before every task
            # has been obtained and checked, so a later refusal still leaves the artifact as it was.
            delta.remove(task_id, vector)
            del vector
            removal.digest_before, removal.digest_after = digest, delta.digest
            digest = removal.digest_after
            delta.log.append(
                task_id,
                digest_before=removal.digest_before,
                digest_after=removal.digest_after,
                cost={"source": removal.source, "replay_steps": steps, "wall_time_s": round(removal.wall_time_s, 3)},
                redact=redact,
                salt=salt,
            )
    if not dry_run:
        # A replayed peft adapter is back at θ0: P (a peft checkpoint) is written from it; see peft_plain_merge.py.
        peft_base = plan.model if replays and is_peft_model(plan.model) else None
        delta.save_pretrained(artifact, base=base if peft_base is None else peft_base)
        report.digest_after = digest
    report.wall_time_s = time.perf_counter() - started
    return report


def _check_replay(delta: MergedDelta, task_id: str, replayed: TaskVector) -> None:
    recorded = delta.record(task_id)["digest"]
    if replayed.digest == recorded:
        return
    detail = describe_mismatch(delta, task_id, replayed)
    raise TaskDigestMismatchError(
        f"the replay of {task_id!r} has digest {replayed.digest}, but {recorded} was merged: {detail}. "
        "Nothing was subtracted and the artifact is unchanged."
    )


@dataclass
class _ReplayPlan:
    """The checked inputs of each replay: shared model and constraint, each task's rows, arguments and threads."""

    model: torch.nn.Module
    constraint: Any
    subsets: dict[str, Any]
    arguments: dict[str, Any]
    threads: dict[str, int | None]
    data_collator: Any
    processing_class: Any

    def replay(self, task_id: str, callbacks: list | None) -> TaskVector:
        from .trainer.multi_task import train_task

        with _threads(self.threads[task_id]):
            return train_task(
                self.model,
                self.subsets[task_id],
                task_id,
                self.arguments[task_id],
                self.constraint,
                data_collator=self.data_collator,
                processing_class=self.processing_class,
                callbacks=callbacks,
            )


def _plan_replays(
    delta: MergedDelta,
    task_ids: list[str],
    model: torch.nn.Module | None,
    dataset: Any,
    task_column: str,
    args: Any,
    data_collator: Any,
    processing_class: Any,
    peft_config: Any,
    allow_environment_mismatch: bool,
    output_dir: Path,
) -> _ReplayPlan:
    """Step 1: check everything a replay needs, before any training; raise naming what differs."""
    from .trainer import environment
    from .trainer.multi_task import group_tasks, prepare_base
    from .trainer.recipe import Recipe
    from .trainer.sift_config import SIFTConfig
    from .trainer.task_sharding import ProcessLayout

    if model is None or dataset is None:
        raise ReplayPreconditionError(
            f"replaying {task_ids[:3]} needs the base `model` and the training `dataset` "
            "(or a `task_vector_store` holding their task vectors)"
        )
    recipes = {t: Recipe.from_dict(delta.record(t).get("metadata", {}).get("recipe")) for t in task_ids}
    arguments = {t: recipes[t].build_args(output_dir) for t in task_ids}  # checks that each recipe rebuilds
    if args is not None:  # the caller's arguments, compared with the recorded ones below
        given = SIFTConfig.from_training_arguments(args)
        arguments = dict.fromkeys(task_ids, given.for_task(None, output_dir=str(output_dir)))
    for task_id in task_ids:
        recorded_seed = recipes[task_id].training_arguments.get("sign_seed")
        if recorded_seed != delta.sign_seed:
            raise ReplayPreconditionError(
                f"task {task_id!r} records sign_seed={recorded_seed}, the artifact has {delta.sign_seed}"
            )
    groups = group_tasks(dataset, task_column)
    missing = [t for t in task_ids if t not in groups]
    if missing:
        raise ReplayPreconditionError(f"the dataset has no row of task(s) {missing[:3]} in column {task_column!r}")
    first = arguments[task_ids[0]]
    model, constraint, fresh = prepare_base(model, first, peft_config=peft_config)
    check_compatible(delta, fresh, "the base model given")
    subsets, threads = {}, {}
    for task_id in task_ids:
        recorded = recipes[task_id]
        subset = dataset.select(groups[task_id])
        # Captured at the recorded recipe's version, hashed as it was: a recipe of version 1 still replays.
        now = Recipe.capture(
            arguments[task_id], task_id, subset, model=model, data_collator=data_collator,
            processing_class=processing_class, version=recorded.version,
        )  # fmt: skip
        problems = recorded.differences(now)
        if problems:
            raise ReplayPreconditionError(f"task {task_id!r} cannot be replayed as recorded: " + "; ".join(problems))
        device = ProcessLayout().device(arguments[task_id].use_cpu)
        cpu = recorded.environment.get("cpu")
        threads[task_id] = cpu.get("threads") if device.type == "cpu" and isinstance(cpu, dict) else None
        with _threads(threads[task_id]):
            differences = environment.environment_differences(
                recorded.environment, environment.probe_environment(device)
            )
        if differences and not allow_environment_mismatch:
            raise EnvironmentMismatchError(
                f"task {task_id!r} was trained in another environment: " + "; ".join(differences) + ". A replay "
                "here would not reproduce it; pass allow_environment_mismatch=True to try anyway (the digest "
                "check still refuses a replay that differs)."
            )
        subsets[task_id] = subset
    return _ReplayPlan(model, constraint, subsets, arguments, threads, data_collator, processing_class)

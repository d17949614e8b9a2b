"""SIFTConfig: the Trainer's arguments plus what sign-fixed finetuning needs."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from functools import cached_property

import torch
from transformers import TrainingArguments

from ..errors import InvalidSIFTConfigError
from ..selection import DEFAULT_EXCLUDE, ParameterSelection
from ..task_id import validate_task_id
from .task_sharding import RANK_DEVICE_VARIABLE


def derive_seed(seed: int, task_id: str | None) -> int:
    """The 32-bit seed of one task: `seed` itself without a task, else a hash of ``(seed, task_id)``."""
    if task_id is None:
        return seed
    digest = hashlib.sha256(f"hf_sift-task-seed\0{seed}\0{task_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass
class SIFTConfig(TrainingArguments):
    """[`~transformers.TrainingArguments`] for [`SIFTTrainer`]: the sign seed, the tuned parameters and the task.

    Every field is a command-line flag through [`~transformers.HfArgumentParser`]. Fields of `TrainingArguments`
    keep their meaning; `full_determinism` defaults to `True` here, because a task can only be unlearned by
    replaying its training bit for bit.

    Args:
        sign_seed (`int`, *optional*, defaults to 0):
            Seed of the random sign vector v. Every task of a merge must use the same one.
        include_parameters (`list[str]`, *optional*, defaults to `[]`):
            Regular expressions (`re.search`) a tuned parameter's name must match, in the spirit of peft's
            `target_modules` (`"q_proj"` picks every parameter under a `q_proj` module). Empty: every trainable
            floating-point parameter.
        exclude_parameters (`list[str]`, *optional*, defaults to `[]`):
            Patterns of parameters never tuned, added to the default exclusion.
        default_exclude (`bool`, *optional*, defaults to `True`):
            Also exclude input embeddings and the LM head (the default selection of docs/FORMAT.md).
        task_id (`str`, *optional*):
            Id of the task being trained. Data order and dropout are seeded from `(seed, task_id)`.
    """

    sign_seed: int = field(
        default=0, metadata={"help": "Seed of the random sign vector v; every task of a merge uses the same one."}
    )
    include_parameters: list[str] = field(
        default_factory=list,
        metadata={"help": "Regex patterns a tuned parameter's name must match (empty: every trainable parameter)."},
    )
    exclude_parameters: list[str] = field(
        default_factory=list, metadata={"help": "Regex patterns of parameters never tuned (added to the default)."}
    )
    default_exclude: bool = field(
        default=True, metadata={"help": "Also exclude the input embeddings and the LM head (the default selection)."}
    )
    task_id: str | None = field(
        default=None, metadata={"help": "Id of the task; data order and dropout are seeded from (seed, task_id)."}
    )
    full_determinism: bool = field(
        default=True,
        metadata={"help": "Deterministic torch algorithms (needed to replay a task bit for bit when unlearning)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.sign_seed, int) or isinstance(self.sign_seed, bool):
            raise InvalidSIFTConfigError(f"`sign_seed` must be an int, got {self.sign_seed!r}")
        if self.task_id is not None:
            self.task_id = validate_task_id(self.task_id)
        try:
            self.selection()
        except ValueError as err:
            raise InvalidSIFTConfigError(str(err)) from None

    def selection(self) -> ParameterSelection:
        """The [`~hf_sift.ParameterSelection`] these arguments describe."""
        exclude = (DEFAULT_EXCLUDE if self.default_exclude else ()) + tuple(self.exclude_parameters)
        return ParameterSelection(include=tuple(self.include_parameters), exclude=exclude)

    @property
    def task_seed(self) -> int:
        """Seed of this task's data order and dropout, derived from `(seed, task_id)`."""
        return derive_seed(self.seed, self.task_id)

    @property
    def task_data_seed(self) -> int | None:
        """Seed of this task's data order when `data_seed` is set, derived from `(data_seed, task_id)`."""
        return None if self.data_seed is None else derive_seed(self.data_seed, self.task_id)

    @cached_property
    def _setup_devices(self) -> torch.device:
        # A rank-local trainer of `train_tasks` (see hf_sift.trainer.task_sharding) sees a single process; the
        # Trainer would then put it on cuda:0 (and use every visible GPU through DataParallel). Pin it to the
        # rank's own GPU instead.
        device = TrainingArguments._setup_devices.func(self)
        pinned = os.environ.get(RANK_DEVICE_VARIABLE, "")
        state = self.distributed_state
        if pinned.startswith("cuda") and not self.use_cpu and state is not None and state.num_processes == 1:
            device = torch.device(pinned)
            torch.cuda.set_device(device)
            self._n_gpu = 1
        return device

    def for_task(self, task_id: str | None, reset_devices: bool = False, **changes) -> SIFTConfig:
        """A copy of these arguments for another task (and other changed fields), without re-validating the rest.

        With `reset_devices`, the copy sets up its devices again when first used (see `rank_local_training`).
        """
        clone = copy.copy(self)
        if reset_devices:
            clone.__dict__.pop("_setup_devices", None)
            clone.distributed_state = None
        clone.task_id = None if task_id is None else validate_task_id(task_id)
        for name, value in changes.items():
            if not hasattr(clone, name):
                raise InvalidSIFTConfigError(f"unknown argument {name!r}")
            setattr(clone, name, value)
        return clone

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments, **sift_fields) -> SIFTConfig:
        """Upgrade plain [`~transformers.TrainingArguments`] to a `SIFTConfig`, keeping every value of `args`."""
        if isinstance(args, SIFTConfig) and not sift_fields:
            return args
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and hasattr(args, f.name)}
        if not isinstance(args, SIFTConfig):
            values["full_determinism"] = args.full_determinism
        values.update(sift_fields)
        return cls(**values)

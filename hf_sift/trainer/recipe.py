"""The recipe of one task: everything a replay of its training must hold fixed, recorded with its task vector.

A task is unlearned by replaying its training and checking that the replay reproduces the recorded digest. The
recipe makes that replay possible months later: the full training arguments (rebuildable into a [`SIFTConfig`]),
the seed the user gave and how the task's seed derives from it, a digest of the task's rows in order, the identity
of the collator, tokenizer and peft adapter, and the environment that decides the bits (library versions, device
model, thread count). It is stored, versioned, under ``"recipe"`` in the task's manifest record; the hashes of each
version are in `recipe_hashes.py`, and a recorded recipe is always compared with the current run's recipe captured
at the recorded version.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidArgumentError, ReplayPreconditionError
from . import recipe_hashes
from .environment import compare_flat, environment_differences, probe_environment
from .recipe_hashes import (
    PROVENANCE_FIELDS,
    RECIPE_VERSION,
    check_version,
    jsonable,
    object_identity,
    rows_digest,
    saved_content_bytes,
    saved_file_bytes,
)
from .sift_config import SIFTConfig, derive_seed


SEED_DERIVATION = "sha256('hf_sift-task-seed\\0{seed}\\0{task_id}')[:4], little-endian (seed itself without task)"

# Training arguments that cannot change what a task's training computes: where and how things are logged,
# saved, evaluated or pushed, and how many processes load data. Every other field of `SIFTConfig` is recorded,
# so a field added by a later transformers is recorded too.
UNRECORDED_ARGUMENTS = frozenset(
    {
        "output_dir",
        "task_id",
        "local_rank",
        "resume_from_checkpoint",
        "do_train",
        "do_eval",
        "do_predict",
        "disable_tqdm",
        "report_to",
        "run_name",
        "project",
        "trackio_space_id",
        "trackio_bucket_id",
        "trackio_static_space_id",
        "logging_strategy",
        "logging_steps",
        "logging_first_step",
        "log_on_each_node",
        "logging_nan_inf_filter",
        "log_level",
        "log_level_replica",
        "include_num_input_tokens_seen",
        "skip_memory_metrics",
        "eval_strategy",
        "eval_steps",
        "eval_delay",
        "eval_on_start",
        "eval_do_concat_batches",
        "eval_use_gather_object",
        "eval_accumulation_steps",
        "per_device_eval_batch_size",
        "prediction_loss_only",
        "include_for_metrics",
        "batch_eval_metrics",
        "bf16_full_eval",
        "fp16_full_eval",
        "load_best_model_at_end",
        "metric_for_best_model",
        "greater_is_better",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "save_on_each_node",
        "save_only_model",
        "enable_jit_checkpoint",
        "restore_callback_states_from_checkpoint",
        "ignore_data_skip",
        "push_to_hub",
        "hub_token",
        "hub_private_repo",
        "hub_model_id",
        "hub_strategy",
        "hub_always_push",
        "hub_revision",
        "ddp_timeout",
        "dataloader_pin_memory",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
        "torch_empty_cache_steps",
    }
)


def peft_identity(model: torch.nn.Module, *, version: int | None = None) -> dict[str, Any] | None:
    """The adapter configs of a `PeftModel` as JSON data (None without peft)."""
    version = check_version(version)
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    return {name: jsonable(config.to_dict(), version) for name, config in sorted(configs.items())}


def training_arguments(args: SIFTConfig) -> dict[str, Any]:
    """Every training argument that can change what training computes, as JSON data."""
    values = args.to_dict()
    return {
        f.name: jsonable(values.get(f.name, getattr(args, f.name)))
        for f in dataclasses.fields(args)
        if f.init and f.name not in UNRECORDED_ARGUMENTS
    }


@dataclass
class Recipe:
    """Everything a replay of one task's training must hold fixed.

    Args:
        task_id (`str`): The task.
        training_arguments (`dict`): The task's [`SIFTConfig`] fields that can change training, with the seed the
            user gave (not the task's derived seed).
        task_seed (`int`): The seed the task trains with, derived from `(seed, task_id)` (see `seed_derivation`).
        rows (`dict`): The task's rows: `{"count": n, "digest": "sha256:..."}` (every column, in order); None
            when not known (a resume comparing a run's arguments before it looks at a task's rows).
        data_collator (`dict`, *optional*): Class and hash of the collator given to the trainer.
        processing_class (`dict`, *optional*): Class and hash of the saved files of the tokenizer or processor.
        peft (`dict`, *optional*): The adapter configs when the model is a `PeftModel`.
        environment (`dict`): See [`probe_environment`].
        version (`int`): Version of this record's layout.
        seed_derivation (`str`): How `task_seed` derives from the user's seed.
    """

    task_id: str
    training_arguments: dict[str, Any]
    task_seed: int
    rows: dict[str, Any] | None
    data_collator: dict[str, str] | None = None
    processing_class: dict[str, str] | None = None
    peft: dict[str, Any] | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    version: int = RECIPE_VERSION
    seed_derivation: str = SEED_DERIVATION

    @classmethod
    def capture(
        cls,
        args: SIFTConfig,
        task_id: str,
        dataset: Any = None,
        *,
        model: torch.nn.Module | None = None,
        data_collator: Any = None,
        processing_class: Any = None,
        environment: dict[str, Any] | None = None,
        version: int | None = None,
    ) -> Recipe:
        """The recipe of training `task_id` on `dataset` with `args` (the user's arguments, not the task's copy).

        `version` (default: `RECIPE_VERSION`) is the layout to capture: a recorded recipe is compared with the
        current run's recipe captured at the recorded one's version.
        """
        version = check_version(version)
        return cls(
            task_id=task_id,
            training_arguments=training_arguments(args),
            task_seed=derive_seed(args.seed, task_id),
            rows=None if dataset is None else {"count": len(dataset), "digest": rows_digest(dataset, version=version)},
            data_collator=object_identity(data_collator, version=version),
            processing_class=object_identity(processing_class, version=version),
            peft=None if model is None else peft_identity(model, version=version),
            environment=environment if environment is not None else {},
            version=version,
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Read a recorded recipe; refuses a newer layout or missing entries."""
        if not isinstance(data, dict):
            raise ReplayPreconditionError("the task's record holds no recipe: it cannot be replayed")
        version = data.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ReplayPreconditionError(f"the recorded recipe has no valid version ({version!r})")
        if version > recipe_hashes.RECIPE_VERSION:
            raise ReplayPreconditionError(f"recipe version {version!r} is newer than this hf_sift reads: upgrade")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted({"task_id", "training_arguments", "task_seed", "rows"} - set(data))
        if missing:
            raise ReplayPreconditionError(f"the recorded recipe lacks {missing}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def build_args(self, output_dir: str | os.PathLike, **overrides: Any) -> SIFTConfig:
        """The [`SIFTConfig`] this recipe was trained with (logging, saving and reporting turned off).

        Raises:
            [`~hf_sift.errors.ReplayPreconditionError`]: the arguments no longer build (another transformers),
            or the config they build records differently.
        """
        values = {
            **self.training_arguments,
            "output_dir": str(output_dir),
            "report_to": "none",
            "save_strategy": "no",
            "logging_strategy": "no",
            "disable_tqdm": True,
            **overrides,
        }
        try:
            args = SIFTConfig(**values)
        except (TypeError, ValueError) as err:
            raise ReplayPreconditionError(
                f"the recorded training arguments no longer build a SIFTConfig: {err}"
            ) from None
        problems = compare_flat(self.training_arguments, training_arguments(args))
        if problems:
            raise ReplayPreconditionError("the recorded training arguments do not rebuild: " + "; ".join(problems))
        if derive_seed(args.seed, self.task_id) != self.task_seed:
            raise ReplayPreconditionError(
                f"task {self.task_id!r}: the recorded task seed {self.task_seed} does not derive from seed "
                f"{args.seed} (recipe of another seed derivation)"
            )
        return args

    def differences(self, other: Recipe, *, data: bool = True) -> list[str]:
        """What `other` changes in what training computes ("learning_rate: recorded 0.0001, now 0.0002").

        The environment is compared separately ([`environment_differences`]); with `data=False` the rows are not
        compared either. Both recipes must be of one version (capture `other` with `version=self.version`): the
        hashes of two versions are not comparable.
        """
        if self.version != other.version:
            raise InvalidArgumentError(
                f"a recipe of version {self.version} compared with one of version {other.version}: capture the run's "
                f"recipe with version={self.version}"
            )
        problems = compare_flat(self.training_arguments, other.training_arguments)
        if self.task_id == other.task_id and self.task_seed != other.task_seed:
            problems.append(f"task_seed: recorded {self.task_seed}, now {other.task_seed}")
        if data and self.rows is not None and other.rows is not None and self.rows != other.rows:
            problems.append(
                f"rows of task {self.task_id!r}: recorded {self.rows['count']} rows ({self.rows['digest'][:19]}…), "
                f"now {other.rows['count']} rows ({other.rows['digest'][:19]}…)"
            )
        for name in ("data_collator", "processing_class", "peft"):
            problems += compare_flat({name: getattr(self, name)}, {name: getattr(other, name)})
        return problems


__all__ = [
    "PROVENANCE_FIELDS",
    "RECIPE_VERSION",
    "Recipe",
    "environment_differences",
    "object_identity",
    "peft_identity",
    "probe_environment",
    "rows_digest",
    "saved_content_bytes",
    "saved_file_bytes",
    "training_arguments",
]

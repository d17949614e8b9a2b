"""SIFTTrainer: the Hugging Face Trainer with the SIFT sign constraint (sign-fixed finetuning)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..errors import InvalidArgumentError, ParameterMismatchError, SiftError
from ..selection import ParameterSelection
from ..task_vector import TaskVector
from .environment import probe_environment
from .log_routing import route_trainer_logs
from .projection_callback import SIFTProjectionCallback
from .recipe import Recipe
from .sift_config import SIFTConfig
from .sign_constraint import SignConstraint, load_reference, tuned_parameters


def select_tuned_names(model: torch.nn.Module, selection: ParameterSelection) -> list[str]:
    """Names of the trainable floating-point parameters of `model` that `selection` picks (sorted)."""
    candidates = {n: p for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()}
    names = selection.resolve(candidates)
    if not names:
        raise ParameterMismatchError("the parameter selection matches no trainable floating-point parameter")
    return names


def freeze_all_but(model: torch.nn.Module, names: list[str]) -> None:
    """Set `requires_grad=False` on every parameter of `model` not in `names`."""
    keep = set(names)
    for name, param in model.named_parameters():
        if name not in keep:
            param.requires_grad_(False)


class SIFTTrainer(Trainer):
    """[`~transformers.Trainer`] that finetunes under the SIFT sign constraint.

    When training starts it snapshots θ0, the tuned parameters (an exact copy, in each parameter's dtype and on its
    device); after every optimizer step it projects them in place so that ``v * (θ - θ0) >= 0`` element-wise,
    where v is the random sign vector of `args.sign_seed`. Parameters outside the selection are frozen and stay
    byte-identical. After `train()`, [`task_vector`] returns the exact [`~hf_sift.TaskVector`].

    Args:
        model (`PreTrainedModel` or `PeftModel`): The model; with a `PeftModel` (or `peft_config`) the constraint
            applies to the trainable adapter parameters.
        args (`SIFTConfig` or `TrainingArguments`, *optional*): Plain `TrainingArguments` are upgraded to a
            [`SIFTConfig`] with the default SIFT fields.
        peft_config (`peft.PeftConfig`, *optional*): Wrap `model` with this adapter first, its initialisation seeded
            with `args.seed` (not the per-task seed), so every task of a merge starts from the same adapter.
        sign_constraint (`SignConstraint`, *optional*): A constraint built beforehand (by [`train_tasks`], which
            shares one θ0 between many tasks); by default it is snapshotted when training starts.
        *trainer_args, **kwargs: Everything else [`~transformers.Trainer`] accepts.
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        args: TrainingArguments | None = None,
        *trainer_args: Any,
        peft_config: Any = None,
        sign_constraint: SignConstraint | None = None,
        **kwargs: Any,
    ):
        if model is None:
            raise InvalidArgumentError("SIFTTrainer needs a `model` (model_init is not supported)")
        args = SIFTConfig.from_training_arguments(
            args if args is not None else SIFTConfig(output_dir="trainer_output")
        )
        adapter_seed = args.seed
        self._sift_user_args = args  # the seeds the user gave, recorded in the recipe
        self._sift_data_collator = trainer_args[0] if trainer_args else kwargs.get("data_collator")
        if args.task_id is not None:
            args = args.for_task(args.task_id, seed=args.task_seed, data_seed=args.task_data_seed)
        if peft_config is not None:
            from peft import get_peft_model

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(adapter_seed)
                model = get_peft_model(model, peft_config)
        names = sign_constraint.names if sign_constraint is not None else select_tuned_names(model, args.selection())
        freeze_all_but(model, names)
        super().__init__(model, args, *trainer_args, **kwargs)
        self._sift_names = names
        self._sift_constraint = sign_constraint
        self._sift_resume_reference: dict[str, torch.Tensor] | None = None
        self.add_callback(SIFTProjectionCallback(lambda: self._sift_constraint, self._start_constraint))
        route_trainer_logs(self)  # the Trainer's log dicts go to `logging`, not to stdout

    # ------------------------------------------------------------------ training

    @property
    def tuned_parameter_names(self) -> list[str]:
        """Sorted names of the tuned parameters P."""
        return list(self._sift_names)

    @property
    def sign_constraint(self) -> SignConstraint | None:
        """The constraint (θ0 and the bounds); None before training starts."""
        return self._sift_constraint

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """Like [`~transformers.Trainer.train`]; a resumed run restores θ0 and checks the sign seed."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise InvalidArgumentError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            self._sift_resume_reference = load_reference(resume_from_checkpoint, self.args.sign_seed)
        return super().train(resume_from_checkpoint or None, *args, **kwargs)

    def _start_constraint(self) -> None:
        """Called when training starts: set θ0 (snapshot, checkpoint reference, or the shared constraint)."""
        model = self.accelerator.unwrap_model(self.model)
        if self._sift_resume_reference is not None:
            params = tuned_parameters(model, self._sift_names)
            self._sift_constraint = SignConstraint.from_reference(
                params, self._sift_resume_reference, self.args.sign_seed
            )
            self._sift_resume_reference = None
        elif self._sift_constraint is None:
            self._sift_constraint = SignConstraint.snapshot(
                tuned_parameters(model, self._sift_names), self.args.sign_seed
            )
        else:
            self._sift_constraint.rebind(model)
        if self._sift_constraint.sign_seed != self.args.sign_seed:
            raise SiftError(
                f"the constraint uses sign_seed={self._sift_constraint.sign_seed}, the arguments {self.args.sign_seed}"
            )

    # ------------------------------------------------------------------ result

    def recipe(self) -> Recipe:
        """The [`Recipe`] of this training: everything a replay must hold fixed, with the environment now."""
        args = self._sift_user_args
        return Recipe.capture(
            args,
            args.task_id,
            self.train_dataset,
            model=self.accelerator.unwrap_model(self.model),
            data_collator=self._sift_data_collator,
            processing_class=self.processing_class,
            environment=probe_environment(self.args.device, self.args.world_size),
        )

    def task_metadata(self) -> dict[str, Any]:
        """The record kept with the task vector: task id, sign seed, steps, and the recipe (or the data fingerprint).

        A task trained by `train_tasks` records its recipe, whose rows digest identifies the data by content. The
        `datasets` fingerprint is recorded only without a recipe: it follows how the dataset was built (a `filter`
        removing another task's rows changes it), so recording it would make equal trainings write different bytes.
        """
        metadata: dict[str, Any] = {
            "task_id": self.args.task_id,
            "sign_seed": self.args.sign_seed,
            "global_step": self.state.global_step,
        }
        if self.args.task_id is not None and hasattr(self.train_dataset, "with_format"):  # a datasets.Dataset
            metadata["recipe"] = self.recipe().to_dict()
        else:
            fingerprint = getattr(self.train_dataset, "_fingerprint", None)
            if fingerprint is not None:
                metadata["data_fingerprint"] = fingerprint
        return metadata

    def task_vector(self, metadata: dict[str, Any] | None = None) -> TaskVector:
        """The task vector of the training so far: exact integer form, mask and digest.

        Args:
            metadata (`dict`, *optional*): Extra JSON-serialisable entries, added to [`task_metadata`].
        """
        if self._sift_constraint is None:
            raise SiftError("call train() before task_vector(): θ0 is taken when training starts")
        return self._sift_constraint.task_vector({**self.task_metadata(), **(metadata or {})})

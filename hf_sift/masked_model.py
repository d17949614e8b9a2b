"""Serve a merged SIFT artifact as a regular transformers model, one task's mask at a time."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from .arena import release_file_pages
from .base_model import BASE_HUB_KWARGS
from .errors import DeltaNotKeptError, ParameterMismatchError, UnsupportedHubPushError
from .masked_export import EXPORT_RECORD_NAME as EXPORT_RECORD_NAME
from .masked_export import export_checkpoint
from .merged_delta import MergedDelta
from .peft_plain_merge import merges_an_adapter
from .served_artifact import ServedArtifact
from .served_base import load_served_base
from .served_weights import check_scale, plain_weights, serve
from .serving_args import check_model_kwargs, resolve_dtype
from .shard_size import DEFAULT_MAX_SHARD_SIZE
from .version import __version__


_CURRENT = object()  # `save_pretrained(task=...)` default: the task being served


class MergedMaskedModel(torch.nn.Module):
    """A transformers model whose tuned weights are the merged SIFT delta restricted to one task's mask.

    Build it with [`MergedMaskedModel.from_pretrained`]. It wraps the model (available as `.model`) and forwards
    everything else to it: calling it runs the model's forward, and `generate`, `config`, `device`,
    `generation_config`... are the model's. [`set_task`] switches the served task in place.

    Served weights are exactly those of [`MergedDelta.materialize`]: for each tuned parameter
    ``dtype(float64(θ0) + float64(Q) · scale · 2**-S)`` where the task's mask is 1 and θ0 where it is 0, with the
    plain merge (no mask) when the task is `None`; every other parameter is the base model's.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        source: ServedArtifact,
        base_weights: dict[str, torch.Tensor] | None,
        task: str | None,
        scale: float,
        provenance: dict[str, Any],
        *,
        plain: dict[str, torch.Tensor] | None = None,
        keep_delta: bool = True,
    ):
        super().__init__()
        self.model = model
        self.training = model.training  # mirror the wrapped model (transformers loads in eval mode)
        # Plain attributes, not buffers: θ0, Q and P stay on the CPU whatever `to()` does, and out of `state_dict`.
        self._source = source
        self._keep = keep_delta  # with False, θ0 and the sum are dropped: no switching
        self._base_weights = base_weights
        self._plain = plain
        self._task = task
        self._scale = scale
        self._provenance = provenance

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        task: str | None = None,
        revision: str | None = None,
        dtype: torch.dtype | str | None = None,
        device_map: str | dict[str, Any] | torch.device | None = None,
        base_model: str | os.PathLike | None = None,
        *,
        keep_delta: bool = True,
        scale: float | None = None,
        allow_base_mismatch: bool = False,
        verify: bool = True,
        model_class: type | None = None,
        model_kwargs: dict[str, Any] | None = None,
        **hub_kwargs: Any,
    ) -> MergedMaskedModel:
        """Load the base model and serve `task` from a merged SIFT artifact (a local folder or a Hub repo id).

        Three steps: resolve the files, load the base, serve. Only the config, the manifest, the requested task's
        mask and the weights served from are read (and downloaded from the Hub): for a format-2 artifact served in
        its stored dtype at scale 1/T, the plain merge P (each task is then `where(mask, P, θ0)`, bit for bit the
        format-1 formula); otherwise (format 1, another `dtype` or `scale`, `allow_base_mismatch`) the sum Q.
        Nothing is returned unless every step succeeds and every digest matches.

        Args:
            path_or_repo_id (`str` or `os.PathLike`): A folder written by [`MergedDelta.save_pretrained`] or a Hub
                repo holding one.
            task (`str`, *optional*): The task to serve; `None` serves the plain merge (no mask).
            revision (`str`, *optional*): Branch, tag or commit of the artifact's Hub repo.
            dtype (`torch.dtype` or `str`, *optional*): Dtype of the served model; defaults to the one the merge
                was built on. Served weights are rounded once from float64 to it.
            device_map (`str`, `dict` or `torch.device`, *optional*): Passed to transformers' `from_pretrained`.
            base_model (`str` or `os.PathLike`, *optional*): Base model name or path; defaults to the one recorded
                in `sift_config.json`. Its weights must match the recorded digest.
            keep_delta (`bool`, *optional*, defaults to `True`): Keep θ0 and the plain-merge weights (P as read,
                or the sum Q) so that [`set_task`] can switch tasks in place. Either way θ0 is only read, and the
                served weights go to new memory that the parameters are pointed at. With `True`, on top of the plain
                model: the served weights (4 bytes per tuned element for fp32) and, served from P, P's tuned tensors
                (4 more): every switch is one bitwise select per parameter. Served from the sum: 8 bytes per tuned
                element for the sum (mapped from the artifact), and the first switch computes the plain-merge
                weights (one more pass, 4 more bytes per tuned element for fp32). With `False` the sum and θ0 are dropped once the weights are
                served (the pages of θ0 that map the checkpoint are released), and so is P: the model then takes the memory of the
                plain model, and cannot switch task.
            scale (`float`, *optional*): Scale of the merged update; defaults to 1/T. NaN and infinite scales are
                refused ([`~hf_sift.errors.InvalidScaleError`]).
            allow_base_mismatch (`bool`, *optional*, defaults to `False`): Serve on a base whose weights differ
                from the recorded digest, with a warning (shapes and dtypes must still match).
            verify (`bool`, *optional*, defaults to `True`): Check P's tensors (or the sum) against their recorded
                digests; the mask and the base are always checked.
            model_class (`type`, *optional*): The transformers auto class; defaults to `AutoModelForSeq2SeqLM` for
                encoder-decoder configs and `AutoModelForCausalLM` otherwise.
            model_kwargs (`dict`, *optional*): More keyword arguments for transformers' `from_pretrained` of the base
                model, e.g. `{"attn_implementation": "sdpa"}`. The ones this method sets itself (`dtype`,
                `device_map`, `revision`, ...) and anything that changes the weights (`quantization_config`,
                `trust_remote_code`) are refused.
            hub_kwargs: `cache_dir`, `token`, `local_files_only`, `force_download`, ... for `huggingface_hub`
                (and, where they apply, for loading the base model).

        Raises:
            [`~hf_sift.errors.UnknownTaskError`], [`~hf_sift.errors.BaseModelMismatchError`],
            [`~hf_sift.errors.MissingBaseModelError`], [`~hf_sift.errors.CorruptArtifactError`],
            [`~hf_sift.errors.ParameterMismatchError`], [`~hf_sift.errors.ServingDtypeError`] or
            [`~hf_sift.errors.ReservedArgumentError`].
        """
        target_dtype = resolve_dtype(dtype)
        model_kwargs = check_model_kwargs(model_kwargs)
        scale = None if scale is None else check_scale(scale)
        # 1. Resolve the files: config, manifest and the task's mask; P or the sum, whichever serving reads.
        source = ServedArtifact.resolve(path_or_repo_id, task, revision, **hub_kwargs)
        stored_dtype = target_dtype is None or set(source.dtypes.values()) == {target_dtype}
        # P holds the weights of the recorded base at scale 1/T in its dtypes: any other request reads the sum.
        from_plain = source.has_plain_merge and stored_dtype and scale in (None, source.default_scale())
        from_plain = from_plain and not allow_base_mismatch
        scale = source.default_scale() if scale is None else scale
        try:
            if merges_an_adapter(source.names):
                raise ParameterMismatchError(
                    f"{path_or_repo_id} merges a peft adapter's parameters (e.g. {source.names[0]!r}), which "
                    "MergedMaskedModel does not serve: wrap the base model with the adapter config and seed of the "
                    "training (the adapter at θ0), then load `MergedDelta.from_pretrained(artifact).materialize("
                    "peft_model.state_dict(), task)` into it (docs/serving.md, 'A peft adapter')"
                )
            return cls._serve(source, task, scale, from_plain, target_dtype, device_map, base_model, keep_delta,
                              allow_base_mismatch, verify, model_class, model_kwargs, hub_kwargs)  # fmt: skip
        except BaseException:
            source.close()
            raise

    @classmethod
    def _serve(
        cls,
        source: ServedArtifact,
        task: str | None,
        scale: float,
        from_plain: bool,
        target_dtype: torch.dtype | None,
        device_map: Any,
        base_model: str | os.PathLike | None,
        keep_delta: bool,
        allow_base_mismatch: bool,
        verify: bool,
        model_class: type | None,
        model_kwargs: dict[str, Any],
        hub_kwargs: dict[str, Any],
    ) -> MergedMaskedModel:
        """Steps 2 and 3 of [`from_pretrained`]: load the base and serve `task` from P or from the sum."""
        if not from_plain:
            source.start_sum_check(verify)  # the sum's digest is checked in the background, as the base loads
        masks = source.load_mask(task)
        base_kwargs = {k: hub_kwargs[k] for k in BASE_HUB_KWARGS if k in hub_kwargs}
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="hf_sift-digest") as pool:
            # 2. Load the base; its digests are computed alongside serving.
            base = load_served_base(
                source, pool, base_model, target_dtype, device_map, model_class, base_kwargs, model_kwargs
            )
            # 3. Serve: the served weights go to new memory which the parameters are then pointed at (θ0 is only
            # read). From P, a bitwise select by the mask; from the sum, the float64 formula.
            plain = None
            if from_plain:
                with source.plain_reader(verify) as reader:  # each tensor's digest checked as it is read
                    plain = source.read_plain(reader)
                    serve(base.model, source, base.weights, masks, scale, plain, fresh=True)
                    reader.check()
            else:
                serve(base.model, source, base.weights, masks, scale, fresh=True)
            base.check(source, allow_base_mismatch)
        source.check_sum()
        if not keep_delta:  # θ0 is not needed any more: release the pages of it that map the checkpoint file
            release_file_pages(base.weights.values())
        provenance = {
            "base_digest": source.base_digest,
            "base_model": base.name,
            "delta_digest": source.config.delta_digest,
            "hf_sift_version": __version__,
            "scale": scale,
        }
        if not keep_delta:
            source.close()  # the sum, if it was read
            return cls(base.model, source, None, task, scale, provenance, keep_delta=False)
        return cls(base.model, source, base.weights, task, scale, provenance, plain=plain)

    # ------------------------------------------------------------------ tasks

    @property
    def tasks(self) -> list[str]:
        """Sorted ids of the tasks this artifact can serve."""
        return self._source.task_ids

    @property
    def task(self) -> str | None:
        """The task being served (`None`: the plain merge)."""
        return self._task

    @property
    def scale(self) -> float:
        """Scale of the merged update (1/T unless given)."""
        return self._scale

    @property
    def delta(self) -> MergedDelta | None:
        """The merged delta (the sum is read on first use for a model served from P), or `None` when loaded with
        `keep_delta=False`."""
        return self._source.delta if self._keep else None

    def set_task(self, task: str | None) -> None:
        """Serve `task` (or the plain merge for `None`) in place: one pass over the tuned parameters.

        The base model and the sum are not reloaded; only the new task's mask is read. The first switch also computes
        the plain-merge weights (one more pass), from which every switch is a bitwise select with θ0. On any error
        the model keeps serving the previous task.

        Raises:
            [`~hf_sift.errors.UnknownTaskError`], [`~hf_sift.errors.CorruptArtifactError`],
            [`~hf_sift.errors.ServingDtypeError`], or [`~hf_sift.errors.DeltaNotKeptError`] when the model was
            loaded with `keep_delta=False`.
        """
        if not self._keep:
            raise DeltaNotKeptError(
                "this model was loaded with keep_delta=False, which drops θ0 and the sum after serving one task; "
                "load it again with the new task (or with keep_delta=True to switch in place)"
            )
        source = self._source
        source.fetch_mask(task)
        if not self._plain_is_current():  # after `to(dtype)`: one more pass from the sum, served weights untouched
            self._plain = None  # free the stale copy before making the new one
            source.start_sum_check(verify=True)
            plain = plain_weights(self.model, source, self._base_weights, self._scale)
            source.check_sum()
            self._plain = plain
        previous = self._task
        try:
            # Served from the mapped mask while its digest is checked; a mismatch restores `previous` below.
            with source.open_mask(task) as masks:
                serve(self.model, source, self._base_weights, masks, self._scale, self._plain)
        except BaseException:
            serve(self.model, source, self._base_weights, source.load_mask(previous), self._scale, self._plain)
            raise
        self._task = task

    def _plain_is_current(self) -> bool:
        """Whether the kept plain-merge weights exist and are in the dtype of the parameters they serve."""
        if self._plain is None:
            return False
        state = self.model.state_dict()
        return all(self._plain[name].dtype == state[name].dtype for name in self._source.names)

    # ------------------------------------------------------------------ export

    def save_pretrained(self, save_directory: str | os.PathLike, task: Any = _CURRENT, **kwargs: Any) -> None:
        """Export a plain transformers checkpoint of one task, which `AutoModelForCausalLM.from_pretrained` loads.

        The folder is written atomically; the artifact's tokenizer files are copied along, and `sift_export.json`
        records which task, merge and base the weights come from.

        Args:
            save_directory (`str` or `os.PathLike`): Where to write the checkpoint.
            task (`str`, *optional*): The task to export; defaults to the one being served (`None`: plain merge).
                Another task is switched in for the export and switched back afterwards.
            kwargs: Passed to the model's `save_pretrained` (e.g. `max_shard_size`, which defaults to hf_sift's
                `DEFAULT_MAX_SHARD_SIZE`, 2GB, as every file hf_sift writes).
        """
        kwargs.setdefault("max_shard_size", DEFAULT_MAX_SHARD_SIZE)
        if task is _CURRENT:
            task = self._task
        previous = self._task
        if task != previous:
            self.set_task(task)
        try:
            self._export(Path(save_directory), task, **kwargs)
        finally:
            if task != previous:
                self.set_task(previous)

    def _export(self, folder: Path, task: str | None, **kwargs: Any) -> None:
        record = {**self._provenance, "task": task}
        export_checkpoint(self.model, folder, self._source.folder, record, **kwargs)

    # ------------------------------------------------------------------ the wrapped model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> MergedMaskedModel:
        """Move or cast the served model (θ0 and the sum stay on the CPU); returns `self`.

        After a cast, [`set_task`] serves in the new dtype, rounded once from float64 as a fresh load in that dtype.
        """
        self.model.to(*args, **kwargs)
        return self

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        """Refused with [`~hf_sift.errors.UnsupportedHubPushError`]: the wrapped model would be pushed without the
        SIFT files. Push the artifact with [`MergedDelta.push_to_hub`] or `hf-sift push` instead."""
        raise UnsupportedHubPushError(
            "MergedMaskedModel.push_to_hub is refused: it would push the wrapped transformers model without the "
            "SIFT artifact (sum, masks, config), so tasks could not be served or removed. Push the artifact "
            "instead: MergedDelta.push_to_hub(repo_id) or `hf-sift push ARTIFACT REPO_ID` (one commit), or export "
            "one task with save_pretrained(folder, task=...) and upload that"
        )

    def __getattr__(self, name: str) -> Any:
        """Forward missing attributes (`generate`, `config`, `device`, ...) to the wrapped model."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not initialised yet: do not recurse
                raise
            return getattr(self.model, name)

    def __repr__(self) -> str:
        return (
            f"MergedMaskedModel(task={self._task!r}, tasks={len(self._source.task_ids)}, scale={self._scale}, "
            f"keep_delta={self._keep}, model={type(self.model).__name__})"
        )

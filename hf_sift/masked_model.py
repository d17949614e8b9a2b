"""Serve a merged SIFT artifact as a regular transformers model, one task's mask at a time."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from .arena import release_file_pages
from .atomic import apply_umask, link_or_copy, staged_folder
from .base_check import check_base_digests, loaded_base_model_digest
from .digest import digest_tensors
from .errors import (
    CorruptArtifactError,
    DeltaNotKeptError,
    InvalidArgumentTypeError,
    MissingBaseModelError,
    ReservedArgumentError,
    ServingDtypeError,
    UnsupportedHubPushError,
)
from .hub.download import TOKENIZER_PATTERNS, ResolvedArtifact, resolve_artifact
from .merged_delta import MergedDelta
from .offload import materialized, offload_slots
from .remote_code import refuse_remote_code
from .served_weights import check_cast, check_scale, plain_weights, serve
from .shard_size import DEFAULT_MAX_SHARD_SIZE
from .version import __version__


EXPORT_RECORD_NAME = "sift_export.json"

# Hub options that also apply to loading the base model with transformers.
_BASE_HUB_KWARGS = ("cache_dir", "token", "local_files_only", "force_download")

# Files of a transformers checkpoint that an export replaces rather than keeps.
_CHECKPOINT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*", "config.json")

_CURRENT = object()  # `save_pretrained(task=...)` default: the task being served


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`None`/"auto" keep the dtype the merge was built on; anything else must be a floating-point dtype."""
    if dtype is None or dtype == "auto":
        return None
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ServingDtypeError(f"cannot serve weights in {dtype!r}: a floating-point dtype is needed")
    return resolved


# `from_pretrained` arguments of the base model that `MergedMaskedModel.from_pretrained` sets itself or that would
# change the weights it serves: refused in `model_kwargs`.
_RESERVED_MODEL_KWARGS = frozenset(
    {
        "pretrained_model_name_or_path",
        "revision",
        "dtype",
        "torch_dtype",
        "device_map",
        "config",
        "state_dict",
        "quantization_config",
        "load_in_8bit",
        "load_in_4bit",
        "trust_remote_code",
        "gguf_file",
        "from_tf",
        "from_flax",
        "use_safetensors",
        "weights_only",
        *_BASE_HUB_KWARGS,
    }
)


def _check_model_kwargs(model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, Mapping):
        raise InvalidArgumentTypeError(f"model_kwargs must be a dict, not {type(model_kwargs).__name__}")
    refused = sorted(set(model_kwargs) & _RESERVED_MODEL_KWARGS)
    if refused:
        raise ReservedArgumentError(
            f"model_kwargs cannot set {refused}: MergedMaskedModel.from_pretrained sets them itself (pass them as its "
            "own arguments where it has them), or they would change the weights it serves"
        )
    return dict(model_kwargs)


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
        delta: MergedDelta | None,
        base_weights: dict[str, torch.Tensor] | None,
        artifact: ResolvedArtifact,
        task: str | None,
        scale: float,
        task_ids: list[str],
        provenance: dict[str, Any],
        plain: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.model = model
        self.training = model.training  # mirror the wrapped model (transformers loads in eval mode)
        # Plain attributes, not buffers: θ0 and Q stay on the CPU whatever `to()` does, and out of `state_dict`.
        self._delta = delta
        self._base_weights = base_weights
        self._plain = plain
        self._artifact = artifact
        self._task = task
        self._scale = scale
        self._task_ids = task_ids
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

        Only the config, the manifest, the sum and the requested task's mask are read (and downloaded from the
        Hub). Nothing is returned unless every step succeeds.

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
            keep_delta (`bool`, *optional*, defaults to `True`): Keep the sum Q and θ0 so that [`set_task`] can
                switch tasks in place. Either way θ0 is only read, and the served weights go to new memory that the
                parameters are pointed at. With `True`, on top of the plain model: 8 bytes per tuned element for the
                sum (mapped from the artifact) and the served weights (4 for fp32). The first switch also computes
                the plain-merge weights (one more pass, 4 more bytes per tuned element for fp32); every switch is then
                one bitwise select per parameter. With `False` the sum and θ0 are dropped once the weights are
                served (the pages of θ0 that map the checkpoint are released): the model then takes the memory of the
                plain model, and cannot switch task.
            scale (`float`, *optional*): Scale of the merged update; defaults to 1/T. NaN and infinite scales are
                refused ([`~hf_sift.errors.InvalidScaleError`]).
            allow_base_mismatch (`bool`, *optional*, defaults to `False`): Serve on a base whose weights differ
                from the recorded digest, with a warning (shapes and dtypes must still match).
            verify (`bool`, *optional*, defaults to `True`): Check the sum against its recorded digest.
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
        target_dtype = _resolve_dtype(dtype)
        model_kwargs = _check_model_kwargs(model_kwargs)
        scale = None if scale is None else check_scale(scale)
        artifact = resolve_artifact(path_or_repo_id, task, revision, **hub_kwargs)
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="hf_sift-digest") as pool:
            delta = MergedDelta.from_pretrained(artifact.folder, verify=False)
            recorded_digest = delta.recorded_digest
            # The sum's digest (a sha256 over ~8 bytes per tuned element) is checked in a background thread while the
            # base model loads and the weights are served; nothing is returned before it matches.
            checking = pool.submit(digest_tensors, delta.sum) if verify else None
            masks = cls._read_mask(delta, artifact, task)
            scale = delta.default_scale() if scale is None else scale

            if base_model is None and delta.base_model is None:
                raise MissingBaseModelError(
                    f"{artifact.folder} does not name its base model: pass base_model= (a name or a folder)"
                )
            base_name = str(base_model) if base_model is not None else delta.base_model
            base_revision = None if base_model is not None else delta.base_revision
            base_kwargs = {k: hub_kwargs[k] for k in _BASE_HUB_KWARGS if k in hub_kwargs}
            refuse_remote_code(base_name, base_revision, **base_kwargs)
            if model_class is None:
                config = AutoConfig.from_pretrained(
                    base_name, revision=base_revision, trust_remote_code=False, **base_kwargs
                )
                model_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            recorded = set(delta.dtypes.values())
            base_dtype = recorded.pop() if len(recorded) == 1 else "auto"

            def load(load_dtype: Any, load_device_map: Any) -> PreTrainedModel:
                return model_class.from_pretrained(
                    base_name,
                    revision=base_revision,
                    dtype=load_dtype,
                    device_map=load_device_map,
                    trust_remote_code=False,
                    **base_kwargs,
                    **model_kwargs,
                )

            # θ0 is read in the dtype the merge was built on; a model in another dtype is loaded by transformers
            # (which knows which modules to keep in float32) and its tuned weights are then rounded once from float64.
            model = load(base_dtype if target_dtype is None else target_dtype, device_map)
            reference = model if target_dtype is None or target_dtype == base_dtype else load(base_dtype, None)
            base_state = reference.state_dict()
            delta.check_base(base_state, verify_digest=False)  # names, shapes, dtypes: checked at once
            # θ0 of the tuned parameters, read from accelerate's offload map for those offloaded to the CPU or disk.
            base_weights = materialized(base_state, offload_slots(reference, delta.names), delta.names)
            # θ0's digest (a sha256 over the tuned weights) is checked alongside the serving pass, below.
            base_digest = pool.submit(digest_tensors, base_weights)
            # The whole base (embeddings and LM head too) against the recorded base model digest, alongside as well.
            model_digest = pool.submit(loaded_base_model_digest, reference, base_state, base_weights)
            if reference is not model:
                check_cast(model, base_state, set(delta.names))
            del reference, base_state
            # θ0 is only read: the served weights, computed from θ0, Q and the mask in one pass, go to new memory which
            # the parameters are then pointed at. The plain-merge weights that make switches cheap come at the first
            # switch.
            serve(model, delta, base_weights, masks, scale, fresh=True)
            check_base_digests(delta, base_digest.result(), model_digest.result(), allow_base_mismatch)
            if not keep_delta:  # θ0 is not needed any more: release the pages of it that map the checkpoint file
                release_file_pages(base_weights.values())

            provenance = {
                "base_digest": delta.base_digest,
                "base_model": base_name,
                "delta_digest": recorded_digest,
                "hf_sift_version": __version__,
                "scale": scale,
            }
            if not keep_delta:
                task_ids, delta, base_weights = delta.task_ids, None, None
            else:
                task_ids = delta.task_ids
            if checking is not None and checking.result() != recorded_digest:
                raise CorruptArtifactError(f"the sum in {artifact.folder} does not match its recorded digest")
            return cls(model, delta, base_weights, artifact, task, scale, task_ids, provenance)

    @staticmethod
    def _fetch_mask(delta: MergedDelta, artifact: ResolvedArtifact, task: str | None) -> None:
        """Check that `task` exists (before anything is downloaded), then make sure its mask file is local."""
        if task is not None:
            delta.record(task)
            artifact.ensure_mask(task)

    @staticmethod
    def _read_mask(delta: MergedDelta, artifact: ResolvedArtifact, task: str | None) -> dict[str, torch.Tensor] | None:
        MergedMaskedModel._fetch_mask(delta, artifact, task)
        return None if task is None else delta.load_mask(task)

    # ------------------------------------------------------------------ tasks

    @property
    def tasks(self) -> list[str]:
        """Sorted ids of the tasks this artifact can serve."""
        return list(self._task_ids)

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
        """The merged delta, or `None` when loaded with `keep_delta=False`."""
        return self._delta

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
        if self._delta is None:
            raise DeltaNotKeptError(
                "this model was loaded with keep_delta=False, which drops the sum after serving one task; "
                "load it again with the new task (or with keep_delta=True to switch in place)"
            )
        self._fetch_mask(self._delta, self._artifact, task)
        if not self._plain_is_current():  # first switch, or after `to(dtype)`: one more pass, served weights untouched
            self._plain = None  # free the stale copy before making the new one
            self._plain = plain_weights(self.model, self._delta, self._base_weights, self._scale)
        previous = self._task
        try:
            # Served from the mapped mask while its digest is checked; a mismatch restores `previous` below.
            with contextlib.nullcontext() if task is None else self._delta.open_mask(task) as masks:
                serve(self.model, self._delta, self._base_weights, masks, self._scale, self._plain)
        except BaseException:
            old_masks = self._read_mask(self._delta, self._artifact, previous)
            serve(self.model, self._delta, self._base_weights, old_masks, self._scale, self._plain)
            raise
        self._task = task

    def _plain_is_current(self) -> bool:
        """Whether the kept plain-merge weights exist and are in the dtype of the parameters they serve."""
        if self._plain is None:
            return False
        state = self.model.state_dict()
        return all(self._plain[name].dtype == state[name].dtype for name in self._delta.names)

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
        with staged_folder(folder) as stage:
            self.model.save_pretrained(stage, **kwargs)
            for path in stage.rglob("*"):  # transformers writes its safetensors files 0600
                if path.is_file():
                    apply_umask(path)
            for path in sorted(self._artifact.folder.iterdir()):
                if any(fnmatch.fnmatch(path.name, p) for p in TOKENIZER_PATTERNS) and not (stage / path.name).exists():
                    link_or_copy(path.resolve(), stage / path.name)
            record = {**self._provenance, "task": task}
            (stage / EXPORT_RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            if folder.is_dir():  # keep the user's other files, not a previous checkpoint's weights
                for path in folder.rglob("*"):
                    relative = path.relative_to(folder)
                    keep = not any(fnmatch.fnmatch(relative.as_posix(), p) for p in _CHECKPOINT_PATTERNS)
                    if path.is_file() and keep and not (stage / relative).exists():
                        link_or_copy(path, stage / relative)

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
            f"MergedMaskedModel(task={self._task!r}, tasks={len(self._task_ids)}, scale={self._scale}, "
            f"keep_delta={self._delta is not None}, model={type(self.model).__name__})"
        )

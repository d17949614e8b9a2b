"""The exact merged delta: an int64 sum of task vectors from which tasks can be added and removed exactly."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import kernels
from .artifact import (
    DEFAULT_MAX_SHARD_SIZE,
    load_mask_file,
    mapped_mask_file,
)
from .artifact_config import ArtifactConfig
from .artifact_state import ArtifactStates
from .compatibility import Compatibility, check_compatible
from .delta_persistence import artifact_config, load_delta, save_delta
from .digest import digest_tensors, state_dict_digest
from .errors import (
    BaseModelMismatchError,
    DuplicateTaskError,
    ParameterMismatchError,
    TaskDigestMismatchError,
    UnknownTaskError,
)
from .fixed_point import INT64_MAX, SCALE_BITS, check_no_overflow, max_abs
from .masks import packed_size
from .plain_merge import RECORDED_BASE
from .selection import ParameterSelection, resolve_parameters
from .served_weights import check_scale, served_tensor
from .task_id import validate_task_id
from .task_vector import TaskVector, check_same_parameters
from .unlearning_log import UnlearningLog


if TYPE_CHECKING:
    from .hub.push import PushResult


class MergedDelta:
    """The sum Q of the integer task vectors of every merged task, with each task's mask and record.

    Adding and removing tasks is exact in any order: after any sequence of `add` and `remove`, the state (and the
    saved bytes) equal a fresh merge of the tasks that remain.

    Args:
        base_state_dict (`Mapping[str, torch.Tensor]`): θ0, the base model's state dict.
        sign_seed (`int`): Seed of the sign vector shared by every task.
        parameters (`ParameterSelection` or list of names, *optional*):
            The tuned parameters P; defaults to every floating-point parameter except input embeddings and the
            LM head.
        scale_bits (`int`, *optional*, defaults to 40): The fixed-point scale S.
        base_model (`str`, *optional*): Name or path of the base model, recorded in `sift_config.json`.
        base_revision (`str`, *optional*): Revision of the base model, recorded likewise.
        base_model_digest (`str`, *optional*): Digest of every tensor of the base model (not only P), from
            [`~hf_sift.digest.state_dict_digest`]; recorded, and checked by [`check_base_model`] and on serving.
        device (`torch.device`, *optional*, defaults to CPU): Where the sum lives.
    """

    def __init__(
        self,
        base_state_dict: Mapping[str, torch.Tensor],
        sign_seed: int,
        parameters: ParameterSelection | Iterable[str] | None = None,
        *,
        scale_bits: int = SCALE_BITS,
        base_model: str | None = None,
        base_revision: str | None = None,
        base_model_digest: str | None = None,
        device: torch.device | str = "cpu",
    ):
        self._artifact_states = ArtifactStates()  # folders loaded from or saved to, for compare-and-swap saves
        selection, names = resolve_parameters(base_state_dict, parameters)
        self.sign_seed = sign_seed
        self.scale_bits = scale_bits
        self.selection = selection
        self.base_model = base_model
        self.base_revision = base_revision
        self.shapes = {n: tuple(base_state_dict[n].shape) for n in names}
        self.dtypes = {n: base_state_dict[n].dtype for n in names}
        self.base_digest = digest_tensors(base_state_dict, names)
        self.base_model_digest = base_model_digest
        self.recorded_digest: str | None = None  # the digest of Q recorded in the artifact last loaded or saved
        self._sum = {n: torch.zeros(self.shapes[n], dtype=torch.int64, device=device) for n in names}
        self._bounds = dict.fromkeys(names, 0)
        self._records: dict[str, dict[str, Any]] = {}
        self._masks: dict[str, Path | dict[str, torch.Tensor]] = {}
        self.log = UnlearningLog()  # the history of removals, saved beside the artifact (see unlearning_log.py)

    # ------------------------------------------------------------------ inspection

    @property
    def task_ids(self) -> list[str]:
        """Sorted ids of the merged tasks."""
        return sorted(self._records)

    @property
    def num_tasks(self) -> int:
        """T, the number of merged tasks."""
        return len(self._records)

    @property
    def names(self) -> list[str]:
        """Sorted names of the tuned parameters."""
        return sorted(self.shapes)

    @property
    def sum(self) -> dict[str, torch.Tensor]:
        """The int64 sum Q per tuned parameter (do not modify in place)."""
        return self._sum

    @property
    def digest(self) -> str:
        """sha256 over the canonical serialisation of Q."""
        return digest_tensors(self._sum)

    def record(self, task_id: str) -> dict[str, Any]:
        """The manifest record of a task: digest, mask digest, density, element counts, metadata."""
        return dict(self._records[self._known(task_id)])

    def __contains__(self, task_id: object) -> bool:
        return isinstance(task_id, str) and task_id in self._records

    def __repr__(self) -> str:
        return (
            f"MergedDelta(num_tasks={self.num_tasks}, parameters={len(self.shapes)}, "
            f"elements={sum(t.numel() for t in self._sum.values())}, sign_seed={self.sign_seed})"
        )

    def _known(self, task_id: str) -> str:
        task_id = validate_task_id(task_id)
        if task_id not in self._records:
            shown = ", ".join(repr(t) for t in self.task_ids[:5])
            more = f", ... ({self.num_tasks} in all)" if self.num_tasks > 5 else ""
            raise UnknownTaskError(f"unknown task {task_id!r}; merged tasks: {shown or 'none'}{more}")
        return task_id

    # ------------------------------------------------------------------ add / remove

    def _apply(self, task_vector: TaskVector, sign: int) -> None:
        # `_bounds` holds upper bounds of max|Q| per tensor: while bound + max|q| fits in int64 no element can
        # overflow and the exact (slower) check is skipped. Every tensor is checked before any is touched, so a
        # refused update leaves the sum unchanged.
        exact = [n for n in self.names if self._bound(n) + task_vector.max_abs[n] > INT64_MAX]
        for name in exact:
            check_no_overflow(self._sum[name], task_vector.q[name].to(self._sum[name].device), name, sign)
        for name in self.names:
            q = task_vector.q[name].to(self._sum[name].device)
            if sign > 0:
                self._sum[name].add_(q)
            else:
                self._sum[name].sub_(q)
            if name in exact:
                self._bounds[name] = max_abs(self._sum[name])
            else:
                self._bounds[name] += task_vector.max_abs[name]

    def _bound(self, name: str) -> int:
        """An upper bound of max|Q| over one tensor (computed on first use after loading)."""
        if name not in self._bounds:
            self._bounds[name] = max_abs(self._sum[name])
        return self._bounds[name]

    def add(self, task_id: str, task_vector: TaskVector) -> None:
        """Merge a task: Q += q_t, and keep its mask and record.

        Raises:
            [`~hf_sift.errors.DuplicateTaskError`], [`~hf_sift.errors.InvalidTaskIdError`],
            [`~hf_sift.errors.ParameterMismatchError`], [`~hf_sift.errors.BaseModelMismatchError`],
            [`~hf_sift.errors.SignSeedMismatchError`] or [`~hf_sift.errors.AccumulatorOverflowError`]; the merge
            is unchanged after any of them.
        """
        task_id = validate_task_id(task_id)
        if task_id in self._records:
            raise DuplicateTaskError(f"task {task_id!r} is already merged; remove it first to replace it")
        check_compatible(self, task_vector)
        self._apply(task_vector, +1)
        self._records[task_id] = {
            "digest": task_vector.digest,
            "mask_density": task_vector.density,
            "num_elements": task_vector.num_elements,
            "num_selected": task_vector.num_selected,
            "metadata": task_vector.metadata,
        }
        self._masks[task_id] = {n: m.detach().cpu() for n, m in task_vector.packed_masks.items()}

    def remove(self, task_id: str, task_vector: TaskVector) -> None:
        """Unmerge a task exactly: Q -= q_t, after checking `task_vector` reproduces the recorded digest.

        Raises:
            [`~hf_sift.errors.UnknownTaskError`], or [`~hf_sift.errors.TaskDigestMismatchError`] when the task
            vector (e.g. a replay of its training) differs from the one merged: it is then never subtracted.
        """
        task_id = self._known(task_id)
        check_compatible(self, task_vector)
        recorded = self._records[task_id]["digest"]
        if task_vector.digest != recorded:
            raise TaskDigestMismatchError(
                f"the task vector given for {task_id!r} has digest {task_vector.digest}, but {recorded} was "
                "merged; the replay did not reproduce the training, so nothing was subtracted"
            )
        self._apply(task_vector, -1)
        del self._records[task_id]
        del self._masks[task_id]

    def absorb(
        self,
        task_sum: Mapping[str, torch.Tensor],
        records: Mapping[str, Mapping[str, Any]],
        masks: Mapping[str, Mapping[str, torch.Tensor]],
        *,
        source: MergedDelta | Compatibility,
    ) -> None:
        """Merge tasks whose task vectors were summed elsewhere: Q += `task_sum`, and take their records and masks.

        This joins merges built in parallel over disjoint sets of tasks (e.g. `task_sum` is the all-reduce of the
        partial sums of several processes). Exact like [`add`]: the result equals adding the tasks one by one.

        Args:
            task_sum (`Mapping[str, torch.Tensor]`): The int64 sum of the task vectors of the tasks in `records`.
            records (`Mapping[str, dict]`): Each task's record, as [`record`] returns it.
            masks (`Mapping[str, dict[str, torch.Tensor]]`): Each task's packed masks.
            source ([`MergedDelta`] or [`~hf_sift.compatibility.Compatibility`]): The merge these tasks were summed
                in (or its `Compatibility`): its sign seed, S, base digest and tuned parameters must equal these.

        Raises:
            [`~hf_sift.errors.SignSeedMismatchError`], [`~hf_sift.errors.BaseModelMismatchError`],
            [`~hf_sift.errors.ParameterMismatchError`], [`~hf_sift.errors.DuplicateTaskError`] or
            [`~hf_sift.errors.AccumulatorOverflowError`]; the merge is unchanged after any of them.
        """
        check_compatible(self, source, "the merge absorbed")
        ids = [validate_task_id(t) for t in records]
        duplicate = sorted(set(ids) & set(self._records))
        if duplicate:
            raise DuplicateTaskError(f"task(s) {duplicate[:3]} are already merged")
        if set(masks) != set(ids):
            raise ParameterMismatchError("`masks` and `records` must cover the same tasks")
        for task_id in ids:
            check_same_parameters({n: (packed_size(t.numel()),) for n, t in self._sum.items()}, masks[task_id], "mask")
        check_same_parameters(self.shapes, task_sum, "the task sum")
        for name in self.names:
            if task_sum[name].dtype != torch.int64:
                raise ParameterMismatchError(f"the task sum of {name!r} is {task_sum[name].dtype}, not int64")
            check_no_overflow(self._sum[name], task_sum[name].to(self._sum[name].device), name)
        for name in self.names:
            self._sum[name].add_(task_sum[name].to(self._sum[name].device))
            self._bounds[name] = max_abs(self._sum[name])
        for task_id in ids:
            self._records[task_id] = dict(records[task_id])
            self._masks[task_id] = {n: m.detach().cpu() for n, m in masks[task_id].items()}

    # ------------------------------------------------------------------ serving

    def load_mask(self, task_id: str) -> dict[str, torch.Tensor]:
        """The packed mask of one task (read from its own file when the delta was loaded from disk)."""
        task_id = self._known(task_id)
        source = self._masks[task_id]
        if isinstance(source, Path):
            return load_mask_file(source, self._records[task_id]["mask_digest"], self.shapes)
        return source

    @contextlib.contextmanager
    def open_mask(self, task_id: str) -> Iterator[dict[str, torch.Tensor]]:
        """Like [`load_mask`], but mapped from its file while the digest is checked alongside.

        Use the masks inside the block; a digest mismatch raises [`~hf_sift.errors.CorruptArtifactError`] when it
        exits, and whatever was computed from them must then be discarded.
        """
        task_id = self._known(task_id)
        source = self._masks[task_id]
        if not isinstance(source, Path):
            yield source
            return
        with mapped_mask_file(source, self._records[task_id]["mask_digest"], self.shapes) as masks:
            yield masks

    def default_scale(self) -> float:
        """1/T, the paper's scale (0 when nothing is merged)."""
        return 1.0 / self.num_tasks if self.num_tasks else 0.0

    def check_base(self, base_state_dict: Mapping[str, torch.Tensor], verify_digest: bool = True) -> None:
        """Raise unless `base_state_dict` has the tuned parameters with the recorded shapes, dtypes and digest."""
        check_same_parameters(self.shapes, base_state_dict, "the base state dict")
        for name, dtype in self.dtypes.items():
            if base_state_dict[name].dtype != dtype:
                raise ParameterMismatchError(
                    f"base parameter {name!r} is {base_state_dict[name].dtype}, the merge was built on {dtype}"
                )
        if verify_digest and digest_tensors(base_state_dict, self.names) != self.base_digest:
            raise BaseModelMismatchError("the base model's weights differ from the ones this delta was built on")

    def check_base_model(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Raise unless every tensor of `state_dict` (the whole base model) matches the recorded base model digest.

        Call it before a replay: embeddings and the LM head are not tuned but shape training. Artifacts written
        without that digest only get a warning (their tuned parameters are still checked by [`check_base`]).

        Raises:
            [`~hf_sift.errors.BaseModelMismatchError`].
        """
        if self.base_model_digest is None:
            warnings.warn(
                "this delta records no digest of the whole base model (written by an older hf_sift, or built without "
                "base_model_digest=): only the tuned parameters can be checked",
                stacklevel=2,
            )
            return
        if state_dict_digest(state_dict) != self.base_model_digest:
            raise BaseModelMismatchError(
                "the base model differs from the one this delta was built on (some tensor of its state dict, e.g. "
                "the embeddings or the LM head, has other values, names, shapes or dtypes)"
            )

    def materialize(
        self,
        base_state_dict: Mapping[str, torch.Tensor],
        task: str | None = None,
        scale: float | None = None,
        verify_base: bool = True,
    ) -> dict[str, torch.Tensor]:
        """The full served state dict for `task` (or the plain merge when `task` is None).

        Tuned parameters become ``θ0 + scale · (Q · 2**-S masked by m_task)`` (see
        [`~hf_sift.served_weights.served_tensor`], the one place that computes served weights); every other entry of
        `base_state_dict` is returned as is. `scale` defaults to 1/T and must be finite.
        """
        scale = self.default_scale() if scale is None else check_scale(scale)
        masks = self.load_mask(task) if task is not None else None
        self.check_base(base_state_dict, verify_digest=verify_base)
        served = dict(base_state_dict)
        with kernels.deferred():
            for name in self.names:
                mask = None if masks is None else masks[name]
                served[name] = served_tensor(
                    base_state_dict[name], self._sum[name], mask, scale=scale, scale_bits=self.scale_bits
                )
        return served

    # ------------------------------------------------------------------ persistence

    def _config(self) -> ArtifactConfig:
        return artifact_config(self)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        *,
        overwrite: bool = False,
        base: str | os.PathLike | None | object = RECORDED_BASE,
    ) -> None:
        """Write the artifact to `save_directory` atomically (see docs/FORMAT.md).

        With access to the base model (by default the one recorded as `base_model`), the artifact is format 2: it
        also holds the plain merge P as a transformers checkpoint (`config.json`, `model.safetensors`, ...), which
        `AutoModelForCausalLM.from_pretrained(save_directory)` loads and from which one task is served without the
        sum. The base is loaded (with transformers, in the merge's dtypes) and checked against the recorded digests
        for that; without a base the artifact is format 1, with a warning.

        Other files in the folder (a tokenizer, a README) are kept. A crash at any point leaves the previous
        artifact intact. Masks already on disk are hard-linked rather than rewritten. The save is a compare-and-swap:
        into a folder this delta was loaded from or saved to, it succeeds only if the folder still holds that state;
        into any other folder (always, for a delta built fresh), only if it holds no artifact. See docs/FORMAT.md.

        Args:
            save_directory (`str` or `os.PathLike`): The artifact folder.
            max_shard_size (`int` or `str`, *optional*, defaults to `"2GB"`): Shard the sum above this size.
            overwrite (`bool`, *optional*, defaults to `False`): Replace whatever artifact the folder holds.
            base (`str`, `os.PathLike` or `PeftModel`, *optional*): Folder or Hub name of the base model to write P
                from; defaults to the recorded `base_model` (at `base_revision`). When the tuned parameters are a
                peft adapter's, the `PeftModel` at θ0: P is then the merged adapter as a peft checkpoint (see
                `hf_sift/peft_plain_merge.py`). `None` writes format 1 (no P).

        Raises:
            [`~hf_sift.errors.ConcurrentUpdateError`]: the folder changed (another writer saved it) or holds another
            artifact; it names what changed and the folder is left as it is. Reload with [`from_pretrained`],
            reapply the change and save again.
        """
        save_delta(self, save_directory, max_shard_size, overwrite=overwrite, base=base)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, verify: bool = True, *, revision: str | None = None, **hub_kwargs: Any
    ) -> MergedDelta:
        """Load an artifact written by [`save_pretrained`] (a folder, or a Hub repo id), streaming Q tensor by tensor.

        A repo id is downloaded into the Hugging Face cache first: the config, the manifest, the sum and every mask
        at `revision` (`hub_kwargs`: `cache_dir`, `token`, `local_files_only`, ...; see `hf_sift.hub`).

        Masks stay on disk and are read one task at a time by [`load_mask`]. With `verify`, the sum is checked
        against its recorded digest (missing, truncated or corrupted files raise
        [`~hf_sift.errors.CorruptArtifactError`]). Every field of the config and the manifest is checked, and so is
        the binding digest that ties the fields deciding the served weights together. A load that overlaps a save
        starts over, so the delta holds one saved state, which it remembers: [`save_pretrained`] into `directory`
        succeeds only if it is still there.

        Raises:
            [`~hf_sift.errors.CorruptArtifactError`] (a missing, truncated, malformed or edited file, naming the file
            and field) or [`~hf_sift.errors.IncompatibleArtifactError`].
        """
        return load_delta(cls, directory, verify, revision, hub_kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> PushResult:
        """Push this delta, as [`save_pretrained`] writes it, to the Hub in one commit (see `hf_sift.hub.push_to_hub`
        for the arguments and errors)."""
        from .hub.push import push_delta

        return push_delta(self, repo_id, **kwargs)

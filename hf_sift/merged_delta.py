"""The exact merged delta: an int64 sum of task vectors from which tasks can be added and removed exactly."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from . import __version__, kernels
from .artifact import (
    DEFAULT_MAX_SHARD_SIZE,
    FORMAT_VERSION,
    iter_delta,
    load_mask_file,
    mapped_mask_file,
    mask_filename,
    read_config,
    read_manifest,
    write_artifact,
)
from .compatibility import Compatibility, check_compatible
from .digest import digest_tensors
from .errors import (
    BaseModelMismatchError,
    CorruptArtifactError,
    DuplicateTaskError,
    ParameterMismatchError,
    TaskDigestMismatchError,
    UnknownTaskError,
)
from .fixed_point import INT64_MAX, SCALE_BITS, check_no_overflow, max_abs
from .masks import packed_size, select_bits_, unpack_bits
from .selection import ParameterSelection, resolve_parameters
from .task_id import validate_task_id
from .task_vector import TaskVector, check_same_parameters
from .unlearning_log import LOG_NAME, UnlearningLog


# Elements served per step in `served_parameter`; a multiple of 8 so mask bytes split cleanly.
_SERVE_CHUNK = 1 << 18


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptArtifactError(f"unknown dtype {name!r} in the artifact")
    return dtype


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
        device: torch.device | str = "cpu",
    ):
        selection, names = resolve_parameters(base_state_dict, parameters)
        self.sign_seed = sign_seed
        self.scale_bits = scale_bits
        self.selection = selection
        self.base_model = base_model
        self.base_revision = base_revision
        self.shapes = {n: tuple(base_state_dict[n].shape) for n in names}
        self.dtypes = {n: base_state_dict[n].dtype for n in names}
        self.base_digest = digest_tensors(base_state_dict, names)
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

    def served_parameter(
        self,
        name: str,
        base: torch.Tensor,
        packed_mask: torch.Tensor | None = None,
        scale: float | None = None,
        out: torch.Tensor | None = None,
        plain: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Served weights of one parameter (see docs/FORMAT.md).

        Wherever ``Q · m`` is 0 (the mask is 0, or nothing moved): θ0 cast to `out`'s dtype, bit for bit. Elsewhere:
        ``dtype(float64(θ0) + float64(Q) · (scale · 2**-S))``, evaluated in float64 in that order and rounded once to
        `out`'s dtype (default: the base's). The work runs in chunks with reused buffers, so the extra memory is a
        few MiB whatever the parameter's size; `out` may be `base` itself (in-place serving).

        `plain` may hold the plain-merge weights of this parameter computed earlier (same dtype as `out`); the
        masked result is then a bitwise select between `plain` and θ0, without touching Q: this is how a
        [`~hf_sift.MergedMaskedModel`] switches tasks in one cheap pass.
        """
        factor = (self.default_scale() if scale is None else float(scale)) * 2.0 ** (-self.scale_bits)
        total = self._sum[name].reshape(-1)
        base_flat = base.detach().reshape(-1)
        if out is None:
            out = torch.empty_like(base)
        out_flat = out.view(-1)
        numel = out_flat.numel()
        if factor == 0.0 or numel == 0:
            return out.copy_(base)
        # The masked term is computed as float64(±Q·m) · (∓factor) with the sign chosen so that a zero term is
        # -0.0: θ0 + (-0.0) is θ0 bit for bit (θ0 + 0.0 would turn -0.0 into +0.0). Q·m is masked as an integer
        # (exact), and ±Q never overflows since the sum stays within ±(2**63 - 1).
        negate = factor > 0
        # The fused kernels (one pass, threaded) give the same bits as the torch path below, which serves whatever
        # they do not support (other dtypes, devices or layouts, or a build without a C compiler).
        if plain is not None and packed_mask is not None:
            merged = plain.reshape(-1)
            if kernels.select_(out_flat, merged, base_flat, packed_mask):
                return out
        elif plain is None and kernels.serve_(
            out_flat, base_flat, total, packed_mask, -factor if negate else factor, negate
        ):
            return out
        if plain is None:  # reusable chunk buffers, only needed when Q is read
            size = min(_SERVE_CHUNK, numel)
            work = torch.empty(size, dtype=torch.int64, device=out.device)
            wide = torch.empty(size, dtype=torch.float64, device=out.device)
            bits = torch.empty(size, dtype=torch.int64, device=out.device) if packed_mask is not None else None
        for lo in range(0, numel, _SERVE_CHUNK):
            hi = min(lo + _SERVE_CHUNK, numel)
            keep = None
            if packed_mask is not None:
                keep = unpack_bits(packed_mask[lo // 8 : packed_size(hi)], hi - lo).to(out.device).view(torch.uint8)
            if plain is not None:
                merged = plain.reshape(-1)[lo:hi]
                if keep is None:
                    out_flat[lo:hi].copy_(merged)
                else:
                    select_bits_(out_flat[lo:hi], merged, base_flat[lo:hi].to(out.dtype), keep)
                continue
            q = work[: hi - lo]
            q.copy_(total[lo:hi])
            if negate:
                q.neg_()
            if keep is not None:
                m = bits[: hi - lo]
                m.copy_(keep).neg_()  # 1 -> all ones, 0 -> 0
                q.bitwise_and_(m)
            w = wide[: hi - lo]
            w.copy_(q).mul_(-factor if negate else factor).add_(base_flat[lo:hi])
            out_flat[lo:hi].copy_(w)
        return out

    def materialize(
        self,
        base_state_dict: Mapping[str, torch.Tensor],
        task: str | None = None,
        scale: float | None = None,
        verify_base: bool = True,
    ) -> dict[str, torch.Tensor]:
        """The full served state dict for `task` (or the plain merge when `task` is None).

        Tuned parameters become ``θ0 + scale · (Q · 2**-S masked by m_task)`` (see [`served_parameter`]); every
        other entry of `base_state_dict` is returned as is. `scale` defaults to 1/T.
        """
        masks = self.load_mask(task) if task is not None else None
        self.check_base(base_state_dict, verify_digest=verify_base)
        served = dict(base_state_dict)
        with kernels.deferred():
            for name in self.names:
                served[name] = self.served_parameter(
                    name, base_state_dict[name], None if masks is None else masks[name], scale
                )
        return served

    # ------------------------------------------------------------------ persistence

    def _config(self) -> dict[str, Any]:
        return {
            "format": "hf_sift",
            "format_version": FORMAT_VERSION,
            "hf_sift_version": __version__,
            "base_model": self.base_model,
            "base_revision": self.base_revision,
            "base_digest": self.base_digest,
            "sign_seed": self.sign_seed,
            "scale_bits": self.scale_bits,
            "parameters": {
                "selection": None if self.selection is None else self.selection.to_dict(),
                "shapes": {n: list(s) for n, s in sorted(self.shapes.items())},
                "dtypes": {n: str(d).removeprefix("torch.") for n, d in sorted(self.dtypes.items())},
            },
            "num_tasks": self.num_tasks,
            "delta_digest": self.digest,
        }

    def save_pretrained(
        self, save_directory: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    ) -> None:
        """Write the artifact to `save_directory` atomically (see docs/FORMAT.md).

        Other files in the folder (a tokenizer, a README) are kept. A crash at any point leaves the previous
        artifact intact. Masks already on disk are hard-linked rather than rewritten.
        """
        save_directory = Path(save_directory).absolute()
        log = {LOG_NAME: self.log.to_bytes()} if len(self.log) else None
        write_artifact(save_directory, self._config(), self._records, self._sum, self._masks, max_shard_size, log)
        for task_id in self._records:
            self._masks[task_id] = save_directory / mask_filename(task_id)
        saved = read_manifest(save_directory)
        for task_id, record in self._records.items():
            record["mask_digest"] = saved[task_id]["mask_digest"]

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, verify: bool = True) -> MergedDelta:
        """Load an artifact written by [`save_pretrained`], streaming Q tensor by tensor.

        Masks stay on disk and are read one task at a time by [`load_mask`]. With `verify`, the sum is checked
        against its recorded digest (missing, truncated or corrupted files raise
        [`~hf_sift.errors.CorruptArtifactError`]).
        """
        directory = Path(directory).absolute()
        config = read_config(directory)
        records = read_manifest(directory)
        self = cls.__new__(cls)
        params = config["parameters"]
        try:
            self.shapes = {n: tuple(int(d) for d in s) for n, s in params["shapes"].items()}
            self.dtypes = {n: _dtype_from_name(d) for n, d in params["dtypes"].items()}
            selection = params.get("selection")
            self.selection = None if selection is None else ParameterSelection.from_dict(selection)
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise CorruptArtifactError(f"malformed 'parameters' in the config of {directory}: {err}") from None
        self.sign_seed = config["sign_seed"]
        self.scale_bits = config["scale_bits"]
        self.base_model = config["base_model"]
        self.base_revision = config["base_revision"]
        self.base_digest = config["base_digest"]
        self._sum = dict(iter_delta(directory, self.shapes))
        self._bounds = {}  # filled by `_bound` when tasks are added or removed; serving never needs them
        self._records = {t: dict(r) for t, r in records.items()}
        self._masks = {t: directory / mask_filename(t) for t in records}
        self.log = UnlearningLog.load(directory)
        if config["num_tasks"] != len(records):
            raise CorruptArtifactError(f"config says {config['num_tasks']} tasks, the manifest lists {len(records)}")
        if verify and self.digest != config["delta_digest"]:
            raise CorruptArtifactError(f"the sum in {directory} does not match its recorded digest")
        return self

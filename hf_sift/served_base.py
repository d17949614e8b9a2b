"""The second step of serving: load the base model θ0 and start checking it against the artifact's digests."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from .base_check import check_base_digests, loaded_base_model_digest, report_mismatch
from .base_model import BASE_HUB_KWARGS, base_model_class, load_base_model, recorded_base_dtype
from .digest import digest_tensors, named_tensor_digest
from .errors import MissingBaseModelError
from .offload import materialized, offload_slots
from .served_artifact import ServedArtifact
from .served_weights import check_cast


@dataclass
class ServedBase:
    """The loaded base: the model to serve into, θ0 of the tuned parameters, and its digests being computed.

    Args:
        model (`PreTrainedModel`): The base model in the served dtype; its tuned parameters get the served weights.
        weights (`dict[str, torch.Tensor]`): θ0 of the tuned parameters in the merge's dtypes (only read).
        name (`str`): The base model's name or folder.
        digest (`Future[str]`): Digest of θ0 over the tuned parameters, computed in the background.
        model_digest (`Future[str]`): Digest of every tensor of the base model, computed in the background.
    """

    model: PreTrainedModel
    weights: dict[str, torch.Tensor]
    name: str
    digest: Future[Any]
    model_digest: Future[Any]  # the same future as `digest` in format 2 (a map of per-tensor digests)

    def check(self, source: ServedArtifact, allow_mismatch: bool) -> None:
        """Wait for the digests and raise [`~hf_sift.errors.BaseModelMismatchError`] unless they match."""
        recorded = source.config.base_tensor_digests
        if recorded is None:  # format 1: the two sha256 digests
            check_base_digests(source, self.digest.result(), self.model_digest.result(), allow_mismatch)
            return
        found = self.digest.result()
        differ = {n for n in set(found) | set(recorded) if found.get(n) != recorded.get(n)}
        if differ & set(source.names):
            report_mismatch("the base model's weights differ from the ones this delta was built on", allow_mismatch)
        elif differ:
            report_mismatch(
                "the base model differs from the one this delta was built on outside the tuned parameters (e.g. its "
                f"embeddings or LM head, which are served as they are: {sorted(differ)[:2]})",
                allow_mismatch,
            )


def load_served_base(
    source: ServedArtifact,
    pool: ThreadPoolExecutor,
    base_model: str | os.PathLike | None,
    target_dtype: torch.dtype | None,
    device_map: Any,
    model_class: type | None,
    hub_kwargs: dict[str, Any],
    model_kwargs: dict[str, Any],
) -> ServedBase:
    """Load the base named by `base_model` (default: the recorded one) and check its tuned parameters' layout.

    θ0 is read in the dtype the merge was built on; a model in another dtype is loaded by transformers (which knows
    which modules to keep in float32), with θ0 read separately. Its digests are computed in `pool`, alongside
    serving.

    Raises:
        [`~hf_sift.errors.MissingBaseModelError`], [`~hf_sift.errors.ParameterMismatchError`] or
        [`~hf_sift.errors.ServingDtypeError`].
    """
    config = source.config
    if base_model is None and config.base_model is None:
        raise MissingBaseModelError(
            f"{source.folder} does not name its base model: pass base_model= (a name or a folder)"
        )
    name = str(base_model) if base_model is not None else config.base_model
    revision = None if base_model is not None else config.base_revision
    if model_class is None:
        model_class = base_model_class(name, revision, **{k: v for k, v in hub_kwargs.items() if k in BASE_HUB_KWARGS})
    base_dtype = recorded_base_dtype(config.dtypes)

    def load(dtype: Any, load_device_map: Any) -> PreTrainedModel:
        return load_base_model(
            name,
            revision,
            dtype,
            device_map=load_device_map,
            model_class=model_class,
            hub_kwargs=hub_kwargs,
            model_kwargs=model_kwargs,
        )

    model = load(base_dtype if target_dtype is None else target_dtype, device_map)
    reference = model if target_dtype is None or target_dtype == base_dtype else load(base_dtype, None)
    state = reference.state_dict()
    _check_layout(source, state)  # names, shapes, dtypes: checked at once
    # θ0 of the tuned parameters, read from accelerate's offload map for those offloaded to the CPU or disk.
    weights = materialized(state, offload_slots(reference, source.names), source.names)
    if source.config.base_tensor_digests is not None:  # format 2: one BLAKE3 per tensor of the whole base
        digest = model_digest = _tensor_digests(pool, reference, state, weights)
    else:  # format 1: θ0's sha256 over the tuned parameters, and the whole base's (embeddings and LM head too)
        digest = pool.submit(digest_tensors, weights)
        model_digest = pool.submit(loaded_base_model_digest, reference, state, weights)
    if reference is not model:
        check_cast(model, state, set(source.names))
    return ServedBase(model, weights, name, digest, model_digest)


def _check_layout(source: ServedArtifact, state: dict[str, torch.Tensor]) -> None:
    from .errors import ParameterMismatchError
    from .task_vector import check_same_parameters

    check_same_parameters(source.shapes, state, "the base state dict")
    for name, dtype in source.dtypes.items():
        if state[name].dtype != dtype:
            raise ParameterMismatchError(
                f"base parameter {name!r} is {state[name].dtype}, the merge was built on {dtype}"
            )


class _Merged:
    """The union of the per-tensor digest maps several futures compute (a future-like `result()`)."""

    def __init__(self, parts: list[Future[dict[str, str]]]):
        self._parts = parts

    def result(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for part in self._parts:
            merged.update(part.result())
        return merged


def _tensor_digests(
    pool: ThreadPoolExecutor, model: torch.nn.Module, state: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]
) -> _Merged:
    """The BLAKE3 digest of every tensor of the loaded base (offloaded ones read one at a time), on two threads."""
    whole = {**state, **tuned}
    slots = offload_slots(model, [n for n in whole if n not in tuned])

    def digests(names: list[str]) -> dict[str, str]:
        return {n: named_tensor_digest(n, slots[n].read() if n in slots else whole[n]) for n in names}

    by_size = sorted(whole, key=lambda n: whole[n].numel() * whole[n].element_size(), reverse=True)
    return _Merged([pool.submit(digests, by_size[0::2]), pool.submit(digests, by_size[1::2])])

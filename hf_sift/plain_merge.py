"""The plain merge P of a format-2 artifact: a standard transformers checkpoint stored next to the sum.

P is the served weights with no mask at scale 1/T, in the base's dtype (docs/FORMAT.md, "Format version 2"): every
parameter of the base model, the untuned ones equal to θ0. It is written by [`write_plain_merge`] when an artifact
is saved with access to its base, and read back tensor by tensor by [`PlainMergeReader`], each tensor checked
against the `blake3:` digest recorded for it in `sift_config.json`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from . import kernels
from .atomic import apply_umask, link_or_copy
from .base_digests import BaseDigests, base_digests, files_key
from .digest import tensor_digest
from .errors import CorruptArtifactError
from .served_weights import served_tensor


if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .merged_delta import MergedDelta


# `MergedDelta.save_pretrained(base=...)` default: the base model the delta records.
RECORDED_BASE: Any = object()

PLAIN_WEIGHTS_NAME = "model.safetensors"
PLAIN_INDEX_NAME = "model.safetensors.index.json"
# The files of P's checkpoint that an artifact save rewrites (tokenizer files are the user's, and are kept).
_PLAIN_FILE = re.compile(
    r"(config\.json|generation_config\.json|model\.safetensors(\.index\.json)?|model-\d+-of-\d+\.safetensors"
    r"|adapter_config\.json|adapter_model\.safetensors)"  # the peft checkpoint of peft_plain_merge.py
)


def is_plain_file(relative_path: str) -> bool:
    """Whether a file (relative to the artifact's root) belongs to the plain-merge checkpoint."""
    return _PLAIN_FILE.fullmatch(relative_path.replace(os.sep, "/")) is not None


def write_plain_merge(
    stage: Path,
    base: PreTrainedModel,
    sums: Mapping[str, torch.Tensor],
    scale: float,
    scale_bits: int,
    max_shard_size: int | str,
    tokenizer_folder: Path | None = None,
    digests: BaseDigests | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Turn `base` (θ0, loaded in the merge's dtypes) into P in place and save it into `stage`; returns its digests.

    Each tuned parameter is overwritten, one at a time, by its served weights without a mask (the one formula of
    [`~hf_sift.served_weights.served_tensor`]); `base` holds P afterwards. The checkpoint is written by
    transformers' `save_pretrained` (config, generation config, weights sharded at `max_shard_size` with an
    index), then read back to record each tensor's digest. Returns P's digests and those of every tensor of θ0's
    state dict ([`named_tensor_digest`]), taken before it is overwritten (or remembered in `digests`). Tokenizer
    files of `tokenizer_folder` (the base's folder) are linked in unless the artifact already has its own.
    """
    from .hub.download import TOKENIZER_PATTERNS

    state = base.state_dict()
    base_digests = (digests or BaseDigests()).tensors(state)
    with torch.no_grad(), kernels.deferred():
        for name in sorted(sums):
            served_tensor(state[name], sums[name], scale=scale, scale_bits=scale_bits, out=state[name])
    base.save_pretrained(stage, max_shard_size=max_shard_size)
    for path in stage.iterdir():  # transformers writes its safetensors files 0600
        if path.is_file() and is_plain_file(path.name):
            apply_umask(path)
    if tokenizer_folder is not None and tokenizer_folder.is_dir():
        for path in sorted(tokenizer_folder.iterdir()):
            matches = any(fnmatch.fnmatch(path.name, p) for p in TOKENIZER_PATTERNS)
            if matches and path.is_file() and not (stage / path.name).exists():
                link_or_copy(path, stage / path.name)
    if not (stage / PLAIN_WEIGHTS_NAME).is_file() and not (stage / PLAIN_INDEX_NAME).is_file():
        raise CorruptArtifactError(
            "transformers wrote no weights for the plain merge (it writes checkpoints on rank 0 only once "
            "torch.distributed is initialized: save on rank 0, or with base=None on the other ranks); nothing was written"
        )
    digests: dict[str, str] = {}
    for filename in plain_files(stage):
        with safe_open(stage / filename, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                digests[name] = tensor_digest(f.get_tensor(name))
    missing = sorted(set(sums) - set(digests))
    if missing:
        raise CorruptArtifactError(
            f"the plain-merge checkpoint transformers wrote lacks tuned parameter(s) {missing[:3]} (saved under "
            "other names?): this model cannot be stored in format 2"
        )
    return digests, base_digests


def plain_files(folder: Path) -> dict[str, list[str]]:
    """Map each weights file of P's checkpoint in `folder` to the tensor names the index puts there."""
    index = folder / PLAIN_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise CorruptArtifactError(f"{index} is not a valid index: {err}") from None
        if not isinstance(weight_map, dict):
            raise CorruptArtifactError(f"{index} has no 'weight_map'")
        files: dict[str, list[str]] = {}
        for name, filename in weight_map.items():
            if not isinstance(filename, str) or Path(filename).name != filename:
                raise CorruptArtifactError(f"{index} names a file outside the artifact: {filename!r}")
            files.setdefault(filename, []).append(name)
        return files
    if not (folder / PLAIN_WEIGHTS_NAME).is_file():
        raise CorruptArtifactError(f"{PLAIN_WEIGHTS_NAME} (the plain merge) is missing from {folder}")
    return {PLAIN_WEIGHTS_NAME: []}


class PlainMergeReader:
    """Read tuned tensors of P from a format-2 artifact, each checked against its recorded digest.

    Tensors are returned as they are read; their digests are computed in a background thread, and
    [`check`] (call it before using what was computed from them for good) raises
    [`~hf_sift.errors.CorruptArtifactError`] naming the first tensor that does not match. Use as a context manager.

    Args:
        folder (`Path`): The artifact folder.
        digests (`Mapping[str, str]`): The recorded `plain_digests`.
        shapes (`Mapping[str, tuple[int, ...]]`): Recorded shapes of the tuned parameters.
        dtypes (`Mapping[str, torch.dtype]`): Recorded dtypes of the tuned parameters (P is stored in them).
        verify (`bool`, *optional*, defaults to `True`): Check the digests.
    """

    def __init__(
        self,
        folder: Path,
        digests: Mapping[str, str],
        shapes: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, torch.dtype],
        verify: bool = True,
    ):
        self._folder = folder
        self._digests = digests
        self._shapes = shapes
        self._dtypes = dtypes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_sift-digest") if verify else None
        self._pending: list[tuple[str, Future[str]]] = []

    def __enter__(self) -> PlainMergeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors `names` of P (tuned parameters), in their recorded dtypes and shapes."""
        wanted = set(names)
        files = plain_files(self._folder)
        located: dict[str, list[str]] = {}
        for filename, listed in files.items():
            for name in listed:
                if name in wanted:
                    located.setdefault(filename, []).append(name)
        if not any(files.values()):  # one unsharded file: names are in the file itself
            located = {PLAIN_WEIGHTS_NAME: sorted(wanted)}
        out: dict[str, torch.Tensor] = {}
        for filename, listed in sorted(located.items()):
            path = self._folder / filename
            try:
                with safe_open(path, framework="pt") as f:
                    present = set(f.keys())
                    for name in sorted(listed):
                        if name not in present:
                            raise CorruptArtifactError(f"{path} lacks the plain merge of {name!r}")
                        tensor = f.get_tensor(name)
                        self._check_layout(path, name, tensor)
                        out[name] = tensor
                        if self._pool is not None:
                            self._pending.append((name, self._pool.submit(tensor_digest, tensor)))
            except (SafetensorError, OSError) as err:
                raise CorruptArtifactError(f"cannot read the plain merge {path}: {err}") from None
        missing = sorted(wanted - set(out))
        if missing:
            raise CorruptArtifactError(f"the plain merge in {self._folder} lacks {missing[:3]}")
        return out

    def _check_layout(self, path: Path, name: str, tensor: torch.Tensor) -> None:
        expected = (self._dtypes[name], tuple(self._shapes[name]))
        if (tensor.dtype, tuple(tensor.shape)) != expected:
            raise CorruptArtifactError(
                f"{path}: {name!r} is {tensor.dtype} {tuple(tensor.shape)}, expected {expected[0]} {expected[1]}"
            )

    def check(self) -> None:
        """Wait for the digests of every tensor read so far; raise if one differs from the recorded digest."""
        for name, digest in self._pending:
            if digest.result() != self._digests.get(name):
                raise CorruptArtifactError(
                    f"the plain merge of {name!r} in {self._folder} does not match its recorded digest (corrupted or "
                    "replaced)"
                )
        self._pending.clear()


def load_plain_base(
    name: str | os.PathLike,
    revision: str | None,
    dtypes: Mapping[str, torch.dtype],
    base_digest: str,
    base_model_digest: str | None,
    local_files_only: bool = False,
) -> tuple[PreTrainedModel, BaseDigests] | None:
    """Load θ0 to write P from, checked against the merge's digests; `None` when P cannot be a plain checkpoint.

    Returns the model and its digests, remembered for the rest of the process while its files do not change (see
    [`~hf_sift.base_digests`]): saving again on the same base loads it but does not hash it again.

    The tuned parameters must be parameters of the base model as transformers loads it; when they are not (a peft
    adapter's parameters), there is no plain checkpoint to write and the artifact stays format 1 (with a warning).

    Raises:
        [`~hf_sift.errors.BaseModelMismatchError`] if the base differs from the one the merge was built on.
    """
    import warnings

    from .base_model import load_base_model, recorded_base_dtype
    from .errors import BaseModelMismatchError

    dtype = recorded_base_dtype(dtypes)
    key = files_key(name, revision, dtype)
    model = load_base_model(name, revision, dtype, hub_kwargs={"local_files_only": local_files_only})
    digests = base_digests(key if key is not None and files_key(name, revision, dtype) == key else None)
    state = model.state_dict()
    outside = sorted(set(dtypes) - set(state))
    if outside:
        warnings.warn(
            f"the tuned parameters are not all parameters of the base model {name} (e.g. {outside[:2]}: a peft "
            "adapter?); the plain merge is not written and the artifact stays format 1 (served through the sum)",
            stacklevel=3,
        )
        return None
    wrong = [n for n, dtype in dtypes.items() if state[n].dtype != dtype]
    if wrong or digests.tuned(state, sorted(dtypes)) != base_digest:
        raise BaseModelMismatchError(
            f"the base model {name} differs from the one this delta was built on (tuned parameters): the plain merge "
            "would be wrong; nothing was written"
        )
    if base_model_digest is not None and digests.whole(state) != base_model_digest:
        raise BaseModelMismatchError(
            f"the base model {name} differs from the one this delta was built on (outside the tuned parameters): the "
            "plain merge would be wrong; nothing was written"
        )
    return model, digests


def plain_merge_writer(
    delta: MergedDelta, base: str | os.PathLike | None | object, max_shard_size: int | str
) -> Callable[[Path], tuple[dict[str, str], dict[str, str]]] | None:
    """What writes P into an artifact's staging folder (`None`: the artifact is format 1), with θ0 loaded now.

    `base` is the base model's folder or Hub name, [`RECORDED_BASE`] for the one `delta` records (at its recorded
    revision), a `PeftModel` at θ0 when the tuned parameters are its adapter's (P is then a peft checkpoint, see
    [`~hf_sift.peft_plain_merge`]), or `None`. A delta that records no base is saved as format 1, with a warning.
    """
    import warnings

    from .peft_plain_merge import is_peft_model, peft_plain_merge_writer

    if is_peft_model(base):
        return peft_plain_merge_writer(delta, base)

    recorded = base is RECORDED_BASE
    revision = delta.base_revision if recorded else None
    if recorded:
        base = delta.base_model
        if base is None:
            warnings.warn(
                "this delta records no base model: saving it as format 1 (without the plain merge P); pass base= to "
                "save_pretrained, or upgrade it later with `hf-sift upgrade ARTIFACT --base MODEL`",
                stacklevel=3,
            )
    if base is None:
        return None
    try:
        # The recorded base is only looked for locally (a folder or the Hub cache): a save never starts a download
        # of its own; an explicit `base` may download.
        loaded = load_plain_base(
            base, revision, delta.dtypes, delta.base_digest, delta.base_model_digest, local_files_only=recorded
        )
    except OSError as err:  # transformers' "not a folder nor a Hub repo" (or not in the cache)
        if not recorded:
            raise
        warnings.warn(
            f"the recorded base model {base!r} cannot be loaded ({str(err).splitlines()[0]}): saving as format 1 "
            "(without the plain merge P); pass base= to save_pretrained",
            stacklevel=3,
        )
        return None
    if loaded is None:
        return None
    model, digests = loaded
    folder = Path(base) if Path(base).is_dir() else None
    scale, scale_bits, sums = delta.default_scale(), delta.scale_bits, delta.sum
    return lambda stage: write_plain_merge(stage, model, sums, scale, scale_bits, max_shard_size, folder, digests)

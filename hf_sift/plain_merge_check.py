"""`hf-sift verify`'s checks of the plain merge P of a format-2 artifact (see docs/FORMAT.md, "Verifying").

Always (cheap: one read of P, hashed with BLAKE3): every weights file of P's checkpoint is read, each tensor must
have the `blake3:` digest `plain_digests` records for it, the checkpoint must hold exactly the recorded tensors, and
each untuned tensor of P must equal θ0 (its named digest must be the one `base_tensor_digests` records).

When the recorded base model can be loaded without a download (a folder, or in the Hugging Face cache): each
tuned tensor of P must also equal what the sum gives, the plain merge at scale 1/T recomputed in float64 from θ0
and Q while [`~hf_sift.verify.verify_artifact`] streams Q for its digest (no second read of the sum; one pass of
the served-weight arithmetic, as a save does). Without the base this check is skipped with a warning: the
digests then only prove that P is the P that was written.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .artifact_config import ArtifactConfig
from .digest import named_tensor_digest, tensor_digest
from .errors import SiftError
from .peft_plain_merge import ADAPTER_WEIGHTS_NAME, stored_peft_names
from .plain_merge import plain_files
from .served_weights import served_tensor


class PlainMergeCheck:
    """Check P against its digests and θ0 at once; against the sum as [`visit`] is given each tensor of Q.

    Args:
        directory (`Path`): The artifact folder.
        config (`ArtifactConfig`): Its config (format 2).
        num_tasks (`int`): T, from the manifest: P is stored at scale 1/T.
    """

    def __init__(self, directory: Path, config: ArtifactConfig, num_tasks: int):
        self.problems: list[str] = []
        self._config = config
        self._scale = 1.0 / num_tasks if num_tasks else 0.0
        self._stack = contextlib.ExitStack()
        self._where: dict[str, tuple[str, Any, str]] = {}  # recorded name -> (file, handle, name in the file)
        self._base: dict[str, torch.Tensor] | None = None
        self._mismatched: list[str] = []
        self._reported: set[str] = set()  # tensors already found bad: not compared with the sum as well
        self._peft = (directory / ADAPTER_WEIGHTS_NAME).is_file()
        if self._peft:
            self._open_peft(directory)
        else:
            self._open(directory)
        if self._where:
            self._check_digests()
            self._base = self._load_base()

    def _open_peft(self, directory: Path) -> None:
        """A peft plain merge: the adapter file holds the tuned tensors, under peft's names."""
        try:
            mapping = stored_peft_names(directory, self._config.shapes)
            handle = self._stack.enter_context(safe_open(directory / ADAPTER_WEIGHTS_NAME, framework="pt"))
        except (SiftError, SafetensorError, OSError) as err:
            self.problems.append(f"{ADAPTER_WEIGHTS_NAME}: {err}")
            return
        extra = sorted(set(handle.keys()) - set(mapping.values()))
        if extra:
            self.problems.append(f"{ADAPTER_WEIGHTS_NAME}: holds tensors that are not tuned, e.g. {extra[:3]}")
        self._where = {name: (ADAPTER_WEIGHTS_NAME, handle, key) for name, key in mapping.items()}

    def _open(self, directory: Path) -> None:
        try:
            files = plain_files(directory)
        except SiftError as err:
            self.problems.append(str(err))
            return
        for filename in files:
            try:
                handle = self._stack.enter_context(safe_open(directory / filename, framework="pt"))
            except (SafetensorError, OSError) as err:
                self.problems.append(f"{filename}: cannot be read ({err})")
                self._where.clear()
                return
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name in self._where:
                    self.problems.append(f"{filename}: holds the tensor {name!r} a second time")
                self._where[name] = (filename, handle, name)

    def _check_digests(self) -> None:
        recorded = self._config.plain_digests or {}
        base_digests = self._config.base_tensor_digests or {}
        extra = sorted(set(self._where) - set(recorded))
        if extra:
            self.problems.append(f"the plain merge holds tensor(s) plain_digests does not record, e.g. {extra[:3]}")
        missing = sorted(set(recorded) - set(self._where))
        if missing:
            self.problems.append(f"the plain merge lacks recorded tensor(s), e.g. {missing[:3]}")
        tuned = self._config.shapes
        for name in sorted(set(self._where) & set(recorded)):
            filename, handle, key = self._where[name]
            try:
                tensor = handle.get_tensor(key)
            except (SafetensorError, OSError) as err:
                self._reported.add(name)
                self.problems.append(f"{filename}: {name!r} cannot be read ({err})")
                continue
            if tensor_digest(tensor) != recorded[name]:
                self._reported.add(name)
                self.problems.append(f"{filename}: {name!r} does not match its digest in plain_digests")
            elif name in tuned:
                if tensor.dtype != self._config.dtypes[name] or tuple(tensor.shape) != tuned[name]:
                    self.problems.append(f"{filename}: {name!r} is {tensor.dtype} {tuple(tensor.shape)}")
            elif name in base_digests and named_tensor_digest(name, tensor) != base_digests[name]:
                self.problems.append(f"{filename}: {name!r} is not tuned, but differs from the base model's")

    def _load_base(self) -> dict[str, torch.Tensor] | None:
        """θ0 of the tuned parameters, from the recorded base loaded without a download (`None` when it cannot)."""
        from .base_model import load_base_model, recorded_base_dtype

        config = self._config
        reason = "the artifact records no base model"
        if self._peft:
            reason = "the plain merge is a peft adapter, whose θ0 (its initialisation) is stored nowhere"
        elif config.base_model is not None:
            try:
                model = load_base_model(
                    config.base_model,
                    config.base_revision,
                    recorded_base_dtype(config.dtypes),
                    hub_kwargs={"local_files_only": True},
                )
            except (OSError, ValueError) as err:
                reason = f"the base model {config.base_model!r} cannot be loaded locally ({str(err).splitlines()[0]})"
            else:
                state = model.state_dict()
                recorded = config.base_tensor_digests or {}
                if all(n in state and named_tensor_digest(n, state[n]) == recorded.get(n) for n in config.shapes):
                    return {n: state[n] for n in config.shapes}
                reason = f"the base model {config.base_model!r} found locally is not the one recorded"
        warnings.warn(
            f"{reason}: the plain merge was checked against its digests, but not recomputed from the sum",
            stacklevel=3,
        )
        return None

    def visit(self, name: str, total: torch.Tensor) -> None:
        """Compare P's tensor `name` with the plain merge recomputed from θ0 and `total` (Q of that tensor)."""
        if self._base is None or name not in self._where or name in self._reported:
            return
        filename, handle, key = self._where[name]
        try:
            stored = handle.get_tensor(key)
        except (SafetensorError, OSError):
            return  # reported by the digest check
        expected = served_tensor(self._base[name], total, scale=self._scale, scale_bits=self._config.scale_bits)
        if not torch.equal(stored, expected):
            self._mismatched.append(f"{filename}: {name!r}")

    def finish(self, sum_verified: bool) -> list[str]:
        """Close P's files and return every problem (P against the sum only when the sum matched its digest)."""
        self._stack.close()
        if sum_verified and self._mismatched:
            self.problems.append(
                f"the plain merge is not what the sum gives (θ0 + Q·2**-S / T) for {len(self._mismatched)} tuned "
                f"tensor(s), e.g. {', '.join(self._mismatched[:2])}"
            )
        return self.problems

"""The SIFT sign constraint on live parameters: θ0 reference, projection after each step, task vector at the end.

For every tuned element the constraint keeps ``v * (θ - θ0) >= 0``. It stores two bound tensors per parameter,
``lower = θ0 where v > 0 else -inf`` and ``upper = +inf where v > 0 else θ0``, so that the projection
``θ <- θ0 + v * max(v * (θ - θ0), 0)`` is a single in-place ``clamp_(lower, upper)``: a select, exact, with no
arithmetic on the weights, and one fused pass over memory. θ0 and the sign of v are both recovered from the bounds
exactly (θ0 must be finite), so the sign vector is generated once per training run and never stored on disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import write_file_atomic
from ..digest import digest_tensors
from ..errors import BaseModelMismatchError, MissingReferenceError, ParameterMismatchError, SignSeedMismatchError
from ..fixed_point import SCALE_BITS, quantize
from ..masks import agreement_mask, pack_bits
from ..sign_vector import SignVector
from ..task_vector import TaskVector


REFERENCE_NAME = "sift_reference.safetensors"
# Elements per step when building a task vector: keeps the float64 temporaries in cache.
_CHUNK = 1 << 20


def tuned_parameters(model: torch.nn.Module, names: Iterable[str]) -> dict[str, torch.nn.Parameter]:
    """The live parameters `names` of `model`, looked up by name (tied parameters appear once)."""
    params = dict(model.named_parameters())
    missing = sorted(set(names) - set(params))
    if missing:
        raise ParameterMismatchError(f"the model lacks {len(missing)} tuned parameter(s), e.g. {missing[:3]}")
    return {name: params[name] for name in sorted(names)}


class SignConstraint:
    """Sign-fixed training state of a set of live parameters.

    Build it with [`SignConstraint.snapshot`] (θ0 = the parameters' current values) or
    [`SignConstraint.from_reference`] (θ0 given, e.g. read back from a checkpoint).

    Args:
        params (`dict[str, torch.nn.Parameter]`): The tuned parameters, by name, updated in place.
        lower (`dict[str, torch.Tensor]`): ``θ0`` where ``v > 0``, ``-inf`` elsewhere.
        upper (`dict[str, torch.Tensor]`): ``+inf`` where ``v > 0``, ``θ0`` elsewhere.
        sign_seed (`int`): Seed of the sign vector v.
    """

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        lower: dict[str, torch.Tensor],
        upper: dict[str, torch.Tensor],
        sign_seed: int,
    ):
        self.params = params
        self.lower = lower
        self.upper = upper
        self.sign_seed = sign_seed

    @classmethod
    def from_reference(
        cls, params: Mapping[str, torch.nn.Parameter], theta0: Mapping[str, torch.Tensor], sign_seed: int
    ) -> SignConstraint:
        """Constrain `params` around the reference `theta0` (copied to each parameter's dtype and device)."""
        signs = SignVector(sign_seed)
        lower, upper = {}, {}
        for name in sorted(params):
            param = params[name]
            if name not in theta0 or tuple(theta0[name].shape) != tuple(param.shape):
                raise ParameterMismatchError(f"the reference lacks {name!r} or has another shape")
            base = theta0[name].detach().to(device=param.device, dtype=param.dtype, copy=True)
            if not torch.isfinite(base).all():
                raise ParameterMismatchError(f"θ0 of {name!r} is not finite")
            positive = signs.positive(name, param.shape, device=param.device)
            lower[name] = base.masked_fill(~positive, -float("inf"))
            upper[name] = base.masked_fill_(positive, float("inf"))
        return cls(dict(sorted(params.items())), lower, upper, sign_seed)

    @classmethod
    def snapshot(cls, params: Mapping[str, torch.nn.Parameter], sign_seed: int) -> SignConstraint:
        """Constrain `params` around their current values (θ0 is an exact copy)."""
        return cls.from_reference(params, {n: p.detach() for n, p in params.items()}, sign_seed)

    # ------------------------------------------------------------------ per step

    @torch.no_grad()
    def project_(self) -> None:
        """Project every tuned parameter in place: ``θ <- θ0 + v * max(v * (θ - θ0), 0)`` (as a select)."""
        for name, param in self.params.items():
            param.clamp_(min=self.lower[name], max=self.upper[name])

    def rebind(self, model: torch.nn.Module) -> None:
        """Point at the live parameters of `model` (same names), moving the bounds to their devices if needed."""
        self.params = tuned_parameters(model, self.params)
        for name, param in self.params.items():
            if self.lower[name].device != param.device:
                self.lower[name] = self.lower[name].to(param.device)
                self.upper[name] = self.upper[name].to(param.device)

    # ------------------------------------------------------------------ θ0

    @property
    def names(self) -> list[str]:
        return list(self.params)

    def theta0(self, name: str) -> torch.Tensor:
        """θ0 of one parameter (a new tensor, exact)."""
        lower = self.lower[name]
        return torch.where(torch.isneginf(lower), self.upper[name], lower)

    def positive(self, name: str) -> torch.Tensor:
        """``v > 0`` of one parameter, read off the bounds."""
        return torch.isposinf(self.upper[name])

    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """θ0 of every tuned parameter."""
        return {name: self.theta0(name) for name in self.params}

    @cached_property
    def base_digest(self) -> str:
        """Digest of θ0 over the tuned parameters (computed once)."""
        return digest_tensors(self.reference_state_dict())

    @torch.no_grad()
    def reset_(self) -> None:
        """Put every tuned parameter back to θ0 in place and drop its gradient."""
        for name, param in self.params.items():
            lower = self.lower[name]
            torch.where(torch.isneginf(lower), self.upper[name], lower, out=param.data)
            param.grad = None

    @torch.no_grad()
    def violations(self) -> int:
        """Number of tuned elements with ``v * (θ - θ0) < 0`` (0 after every projection)."""
        return sum(int(((p < self.lower[n]) | (p > self.upper[n])).sum()) for n, p in self.params.items())

    # ------------------------------------------------------------------ result

    @torch.no_grad()
    def task_vector(self, metadata: dict[str, Any] | None = None, scale_bits: int = SCALE_BITS) -> TaskVector:
        """The [`~hf_sift.TaskVector`] of the current parameters relative to θ0 (exact integers, masks, digest).

        Equal to `TaskVector.from_state_dicts(θ0, θ, sign_seed)`, computed in cache-sized chunks straight from the
        bounds (no full-size float64 temporaries, no regeneration of the sign vector).
        """
        q, masks = {}, {}
        for name, param in self.params.items():
            flat = param.detach().reshape(-1)
            lower, upper = self.lower[name].reshape(-1), self.upper[name].reshape(-1)
            out = torch.empty(flat.numel(), dtype=torch.int64, device=flat.device)
            agree = torch.empty(flat.numel(), dtype=torch.bool, device=flat.device)
            for lo in range(0, flat.numel(), _CHUNK):
                hi = min(lo + _CHUNK, flat.numel())
                low, up = lower[lo:hi], upper[lo:hi]
                base = torch.where(torch.isneginf(low), up, low)
                out[lo:hi] = quantize(base, flat[lo:hi], scale_bits, name)
                agree[lo:hi] = agreement_mask(out[lo:hi], torch.isposinf(up))
            q[name] = out.view(param.shape)
            masks[name] = pack_bits(agree)
        return TaskVector(
            q=q,
            packed_masks=masks,
            sign_seed=self.sign_seed,
            scale_bits=scale_bits,
            base_digest=self.base_digest,
            metadata=dict(metadata or {}),
        )

    # ------------------------------------------------------------------ checkpoints

    def save(self, folder: str | os.PathLike) -> Path:
        """Write θ0, the sign seed and the base digest to `folder`/sift_reference.safetensors (atomically)."""
        path = Path(folder) / REFERENCE_NAME
        tensors = {n: t.detach().cpu().contiguous() for n, t in self.reference_state_dict().items()}
        metadata = {"format": "hf_sift-reference", "sign_seed": str(self.sign_seed), "base_digest": self.base_digest}
        write_file_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        return path


def load_reference(folder: str | os.PathLike, sign_seed: int) -> dict[str, torch.Tensor]:
    """Read θ0 saved by [`SignConstraint.save`], checking the sign seed and the digest."""
    path = Path(folder) / REFERENCE_NAME
    if not path.is_file():
        raise MissingReferenceError(
            f"{folder} holds no {REFERENCE_NAME}: it was not written by SIFTTrainer, so θ0 cannot be recovered"
        )
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        theta0 = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    if metadata.get("format") != "hf_sift-reference":
        raise MissingReferenceError(f"{path} is not a SIFT reference")
    if metadata.get("sign_seed") != str(sign_seed):
        raise SignSeedMismatchError(
            f"the checkpoint was trained with sign_seed={metadata.get('sign_seed')}, the arguments say {sign_seed}"
        )
    if digest_tensors(theta0) != metadata.get("base_digest"):
        raise BaseModelMismatchError(f"{path} does not match its recorded digest (corrupted)")
    return theta0

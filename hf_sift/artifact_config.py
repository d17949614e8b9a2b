"""`sift_config.json` as a typed, validated dataclass, and the checks of the manifest's task records.

Like a peft config, [`ArtifactConfig`] serialises to sorted JSON ([`ArtifactConfig.to_dict`]) and is read back with
[`ArtifactConfig.from_dict`], which drops unknown keys with a warning (forward compatibility) and checks the type
and range of every field: a malformed one raises [`~hf_sift.errors.CorruptArtifactError`] naming it, a format
version newer than this release raises [`~hf_sift.errors.IncompatibleArtifactError`].

The fields that decide the served weights are bound together by `binding_digest` (see [`binding_digest`] and
docs/FORMAT.md): editing any of them, or a task's digest or mask digest in the manifest, is detected on load.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CorruptArtifactError, IncompatibleArtifactError
from .selection import ParameterSelection
from .version import __version__


# Version 2 adds the plain merge P as a transformers checkpoint (`plain_digests`); version 1 artifacts still load.
FORMAT_VERSION = 2
CONFIG_NAME = "sift_config.json"
MANIFEST_NAME = "sift_manifest.json"

# The scale S must leave room for updates in int64 (q = round(τ·2**S)); hf_sift writes 40.
MIN_SCALE_BITS, MAX_SCALE_BITS = 0, 62

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_TENSOR_DIGEST = re.compile(r"blake3:[0-9a-f]{64}")
_BINDING_TAG = "hf_sift-binding-v1\n"

_REQUIRED_KEYS = (
    "base_digest",
    "base_model",
    "base_revision",
    "delta_digest",
    "format",
    "format_version",
    "hf_sift_version",
    "num_tasks",
    "parameters",
    "scale_bits",
    "sign_seed",
)
_OPTIONAL_KEYS = ("base_model_digest", "base_tensor_digests", "binding_digest", "plain_digests")
CONFIG_KEYS = tuple(sorted(_REQUIRED_KEYS + _OPTIONAL_KEYS))
RECORD_KEYS = ("digest", "mask_digest", "mask_density", "num_elements", "num_selected", "metadata")


def _bad(source: str, field: str, expected: str, value: Any) -> CorruptArtifactError:
    return CorruptArtifactError(f"{source}: field {field!r} must be {expected}, got {value!r}")


def _int(source: str, field: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """An int (not a bool) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        expected = "an integer" + ("" if low is None else f" >= {low}" if high is None else f" in [{low}, {high}]")
        raise _bad(source, field, expected, value)
    if high is not None and value > high:
        raise _bad(source, field, f"an integer in [{low}, {high}]", value)
    return value


def _digest(source: str, field: str, value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise _bad(source, field, '"sha256:" followed by 64 lowercase hex digits', value)
    return value


def _optional_str(source: str, field: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _bad(source, field, "a string or null", value)
    return value


def dtype_from_name(name: Any, source: str = CONFIG_NAME, field: str = "parameters.dtypes") -> torch.dtype:
    """The floating-point torch dtype named `name` (e.g. `"bfloat16"`)."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise _bad(source, field, "the name of a floating-point torch dtype", name)
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class ArtifactConfig:
    """The content of `sift_config.json` (see docs/FORMAT.md).

    Args:
        base_digest (`str`): Digest of θ0 over the tuned parameters P.
        sign_seed (`int`): Seed of the sign vector.
        scale_bits (`int`): The fixed-point scale S.
        shapes (`dict[str, tuple[int, ...]]`): Shape of each tuned parameter.
        dtypes (`dict[str, torch.dtype]`): Dtype of each tuned parameter in θ0.
        selection (`ParameterSelection`, *optional*): The patterns that chose P (`None` for an explicit list).
        num_tasks (`int`): T, the number of merged tasks.
        delta_digest (`str`): Digest of the sum Q.
        base_model (`str`, *optional*): Name or path of θ0.
        base_revision (`str`, *optional*): Revision of θ0.
        base_model_digest (`str`, *optional*): Digest of every tensor of the base model's state dict (not only P);
            `None` when unknown (artifacts written before it existed).
        plain_digests (`dict[str, str]`, *optional*): Format 2: the `blake3:` digest of each tensor of the plain
            merge P stored as a transformers checkpoint (checkpoint name -> digest of its raw bytes); `None` for an
            artifact without P (format 1).
        base_tensor_digests (`dict[str, str]`, *optional*): Format 2: the `blake3:` digest of each tensor of the
            base model's state dict (name, dtype and shape included), which serving checks the base against in
            place of the two sha256 digests (a quarter of the time); `None` in format 1.
        binding_digest (`str`, *optional*): Digest binding the fields that decide the served weights to the
            manifest's task digests (see [`binding_digest`]); filled in when the artifact is written.
        format_version (`int`, *optional*, defaults to `FORMAT_VERSION`): Version of the format.
        hf_sift_version (`str`, *optional*): Version of the hf_sift that wrote the artifact.
    """

    base_digest: str
    sign_seed: int
    scale_bits: int
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    selection: ParameterSelection | None
    num_tasks: int
    delta_digest: str
    base_model: str | None = None
    base_revision: str | None = None
    base_model_digest: str | None = None
    binding_digest: str | None = None
    plain_digests: dict[str, str] | None = None
    base_tensor_digests: dict[str, str] | None = None
    format_version: int = 1
    hf_sift_version: str = __version__

    def parameters_dict(self) -> dict[str, Any]:
        return {
            "selection": None if self.selection is None else self.selection.to_dict(),
            "shapes": {n: list(s) for n, s in sorted(self.shapes.items())},
            "dtypes": {n: dtype_name(d) for n, d in sorted(self.dtypes.items())},
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written as `sift_config.json` (optional fields are left out when `None`)."""
        data = {
            "format": "hf_sift",
            "format_version": self.format_version,
            "hf_sift_version": self.hf_sift_version,
            "base_model": self.base_model,
            "base_revision": self.base_revision,
            "base_digest": self.base_digest,
            "base_model_digest": self.base_model_digest,
            "binding_digest": self.binding_digest,
            "plain_digests": None if self.plain_digests is None else dict(sorted(self.plain_digests.items())),
            "base_tensor_digests": (
                None if self.base_tensor_digests is None else dict(sorted(self.base_tensor_digests.items()))
            ),
            "sign_seed": self.sign_seed,
            "scale_bits": self.scale_bits,
            "parameters": self.parameters_dict(),
            "num_tasks": self.num_tasks,
            "delta_digest": self.delta_digest,
        }
        return {k: v for k, v in sorted(data.items()) if v is not None or k not in _OPTIONAL_KEYS}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = CONFIG_NAME) -> ArtifactConfig:
        """Check every field of a parsed `sift_config.json` and build the config.

        Raises:
            [`~hf_sift.errors.CorruptArtifactError`] naming the first malformed or missing field, or
            [`~hf_sift.errors.IncompatibleArtifactError`] for a format version newer than this release reads.
        """
        if not isinstance(data, Mapping):
            raise CorruptArtifactError(f"{source} does not hold a JSON object")
        if data.get("format") != "hf_sift":
            raise _bad(source, "format", '"hf_sift"', data.get("format"))
        version = _int(source, "format_version", data.get("format_version"), 1)
        if version > FORMAT_VERSION:
            raise IncompatibleArtifactError(
                f"{source} has format version {version}; this hf_sift reads versions up to {FORMAT_VERSION}: "
                "upgrade hf_sift"
            )
        unknown = sorted(set(data) - set(CONFIG_KEYS))
        if unknown:
            warnings.warn(f"ignoring unknown keys in {CONFIG_NAME}: {unknown}", stacklevel=3)
        missing = sorted(set(_REQUIRED_KEYS) - set(data))
        if missing:
            raise CorruptArtifactError(f"{source} lacks the field(s) {missing}")
        hf_sift_version = data["hf_sift_version"]
        if not isinstance(hf_sift_version, str):
            raise _bad(source, "hf_sift_version", "a string", hf_sift_version)
        shapes, dtypes, selection = _parameters(source, data["parameters"])
        plain_digests = _plain_digests(source, "plain_digests", data.get("plain_digests"), version, shapes)
        base_tensor_digests = _plain_digests(
            source, "base_tensor_digests", data.get("base_tensor_digests"), version, shapes
        )
        return cls(
            base_digest=_digest(source, "base_digest", data["base_digest"]),
            sign_seed=_int(source, "sign_seed", data["sign_seed"]),
            scale_bits=_int(source, "scale_bits", data["scale_bits"], MIN_SCALE_BITS, MAX_SCALE_BITS),
            shapes=shapes,
            dtypes=dtypes,
            selection=selection,
            num_tasks=_int(source, "num_tasks", data["num_tasks"], 0),
            delta_digest=_digest(source, "delta_digest", data["delta_digest"]),
            base_model=_optional_str(source, "base_model", data["base_model"]),
            base_revision=_optional_str(source, "base_revision", data["base_revision"]),
            base_model_digest=_digest(source, "base_model_digest", data.get("base_model_digest"), optional=True),
            binding_digest=_digest(source, "binding_digest", data.get("binding_digest"), optional=True),
            plain_digests=plain_digests,
            base_tensor_digests=base_tensor_digests,
            format_version=version,
            hf_sift_version=hf_sift_version,
        )

    def compute_binding(self, records: Mapping[str, Mapping[str, Any]]) -> str:
        """The binding digest of this config with the manifest `records` (see [`binding_digest`])."""
        return binding_digest(self, records)

    def check_binding(self, records: Mapping[str, Mapping[str, Any]], source: str) -> None:
        """Raise if a field bound by `binding_digest` was edited; warn if the artifact predates the binding."""
        if self.binding_digest is None:
            warnings.warn(
                f"{source} records no binding_digest (written by an older hf_sift): edits of its scale bits, sign "
                "seed, parameters or task list cannot be detected; save it again to add one",
                stacklevel=3,
            )
            return
        if self.compute_binding(records) != self.binding_digest:
            raise CorruptArtifactError(
                f"{source}: the fields that decide the served weights (format_version, sign_seed, scale_bits, "
                "parameters, num_tasks, base and delta digests, plain_digests, base_tensor_digests, and each task's digest and mask_digest in "
                f"{MANIFEST_NAME}) do not match the recorded binding_digest: the artifact was edited or corrupted"
            )


def binding_digest(config: ArtifactConfig, records: Mapping[str, Mapping[str, Any]]) -> str:
    """sha256 over the canonical JSON of every field that decides the served weights.

    The bytes ``hf_sift-binding-v1\\n`` then the JSON (sorted keys, separators ``,`` and ``:``, UTF-8) of
    ``{"base_digest", "base_model_digest", "delta_digest", "format_version", "num_tasks", "parameters",
    "scale_bits", "sign_seed", "tasks": {task_id: {"digest", "mask_digest"}}}``, plus ``"plain_digests"`` when the
    artifact stores the plain merge (format 2), so that version 1 bindings are unchanged. Other fields (names, versions,
    the free-form task metadata) are not bound.
    """
    bound = {
        "base_digest": config.base_digest,
        "base_model_digest": config.base_model_digest,
        "delta_digest": config.delta_digest,
        "format_version": config.format_version,
        "num_tasks": config.num_tasks,
        "parameters": config.parameters_dict(),
        "scale_bits": config.scale_bits,
        "sign_seed": config.sign_seed,
        "tasks": {t: {"digest": r["digest"], "mask_digest": r["mask_digest"]} for t, r in sorted(records.items())},
    }
    if config.plain_digests is not None:
        bound["plain_digests"] = dict(sorted(config.plain_digests.items()))
    if config.base_tensor_digests is not None:
        bound["base_tensor_digests"] = dict(sorted(config.base_tensor_digests.items()))
    text = json.dumps(bound, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256((_BINDING_TAG + text).encode("utf-8")).hexdigest()


def _parameters(
    source: str, params: Any
) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype], ParameterSelection | None]:
    if not isinstance(params, Mapping) or not {"shapes", "dtypes"} <= set(params):
        raise _bad(source, "parameters", "an object with 'selection', 'shapes' and 'dtypes'", params)
    raw_shapes, raw_dtypes = params["shapes"], params["dtypes"]
    if not isinstance(raw_shapes, Mapping):
        raise _bad(source, "parameters.shapes", "an object of parameter name -> shape", raw_shapes)
    if not isinstance(raw_dtypes, Mapping):
        raise _bad(source, "parameters.dtypes", "an object of parameter name -> dtype", raw_dtypes)
    if set(raw_shapes) != set(raw_dtypes):
        raise CorruptArtifactError(f"{source}: 'parameters.shapes' and 'parameters.dtypes' name other parameters")
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in raw_shapes.items():
        field = f"parameters.shapes[{name!r}]"
        if not name or not isinstance(shape, list):
            raise _bad(source, field, "a list of non-negative integers", shape)
        shapes[name] = tuple(_int(source, field, d, 0) for d in shape)
    dtypes = {n: dtype_from_name(d, source, f"parameters.dtypes[{n!r}]") for n, d in raw_dtypes.items()}
    selection = params.get("selection")
    if selection is not None:
        ok = isinstance(selection, Mapping) and set(selection) <= {"include", "exclude"}
        ok = ok and all(isinstance(p, list) and all(isinstance(x, str) for x in p) for p in selection.values())
        if not ok:
            raise _bad(source, "parameters.selection", "null or lists 'include' and 'exclude' of patterns", selection)
        try:
            selection = ParameterSelection.from_dict(selection)
        except ValueError as err:
            raise _bad(source, "parameters.selection", f"valid regular expressions ({err})", selection) from None
    return shapes, dtypes, selection


def _plain_digests(
    source: str, field: str, value: Any, version: int, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, str] | None:
    """Format 2 requires a `blake3:` digest per tensor, covering at least the tuned parameters; format 1 has none."""
    if version < 2:
        if value is not None:
            raise _bad(source, field, "absent in a format 1 artifact", "an object")
        return None
    if not isinstance(value, Mapping) or not value:
        raise _bad(source, field, "an object of tensor name -> blake3 digest", value)
    for name, digest in value.items():
        if not isinstance(digest, str) or not _TENSOR_DIGEST.fullmatch(digest):
            raise _bad(source, f"{field}[{name!r}]", '"blake3:" followed by 64 lowercase hex digits', digest)
    missing = sorted(set(shapes) - set(value))
    if missing:
        raise CorruptArtifactError(f"{source}: field {field!r} lacks tuned parameter(s) {missing[:3]}")
    return dict(value)


def validate_record(task_id: str, record: Any, source: str = MANIFEST_NAME) -> dict[str, Any]:
    """Check one task record of the manifest; [`~hf_sift.errors.CorruptArtifactError`] names the task and field."""
    where = f"{source}: task {task_id!r}"
    if not isinstance(record, Mapping):
        raise CorruptArtifactError(f"{where}: the record is not a JSON object")
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise CorruptArtifactError(f"{where}: the record lacks the field(s) {missing}")
    _digest(where, "digest", record["digest"])
    _digest(where, "mask_digest", record["mask_digest"])
    num_elements = _int(where, "num_elements", record["num_elements"], 0)
    _int(where, "num_selected", record["num_selected"], 0, num_elements)
    density = record["mask_density"]
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1:
        raise _bad(where, "mask_density", "a number in [0, 1]", density)
    if not isinstance(record["metadata"], Mapping):
        raise _bad(where, "metadata", "a JSON object", record["metadata"])
    return dict(record)

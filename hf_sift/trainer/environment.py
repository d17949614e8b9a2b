"""The environment that decides the bits of a training run, and what differs between two of them."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from ..version import __version__


# Environment entries a replay must match; the determinism switches are recorded but follow from the recorded
# `full_determinism`, which the replay's arguments set again.
COMPARED_ENVIRONMENT = ("versions", "device_type", "cpu", "gpu", "world_size")


def library_versions() -> dict[str, str]:
    """Versions of the libraries a replay must hold fixed."""
    import accelerate
    import datasets
    import safetensors
    import transformers

    versions = {
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "hf_sift": __version__,
        "python": platform.python_version(),
        "safetensors": safetensors.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:  # pragma: no cover - peft is a dependency
        pass
    return versions


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_environment(device: torch.device | str = "cpu", world_size: int = 1) -> dict[str, Any]:
    """What decides the bits of a training run here: versions, device model, threads, determinism switches."""
    device = torch.device(device)
    environment: dict[str, Any] = {
        "versions": library_versions(),
        "device_type": device.type,
        "world_size": world_size,
        "determinism": {
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        },
    }
    if device.type == "cpu":  # CPU kernels split reductions by thread count and pick kernels by instruction set
        environment["cpu"] = {
            "model": cpu_model(),
            "instruction_set": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
        }
    elif device.type == "cuda":
        environment["gpu"] = {
            "name": torch.cuda.get_device_name(device),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    return environment


def _describe_machine(environment: dict[str, Any]) -> str:
    if "cpu" in environment:
        cpu = environment["cpu"]
        return f"{cpu['threads']} threads on {cpu['model']} ({cpu['instruction_set']})"
    if "gpu" in environment:
        gpu = environment["gpu"]
        return f"{gpu['name']} (CUDA {gpu['cuda']}, cuDNN {gpu['cudnn']})"
    return str(environment.get("device_type"))


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def compare_flat(recorded: dict[str, Any], now: dict[str, Any], keys: tuple[str, ...] | None = None) -> list[str]:
    """'key: recorded X, now Y' for each (flattened) entry that differs."""
    if keys is not None:
        recorded = {k: recorded.get(k) for k in keys}
        now = {k: now.get(k) for k in keys}
    left, right = _flat(recorded), _flat(now)
    return [
        f"{key}: recorded {left.get(key, '(absent)')!r}, now {right.get(key, '(absent)')!r}"
        for key in sorted(set(left) | set(right))
        if left.get(key, "(absent)") != right.get(key, "(absent)")
    ]


def environment_differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a recorded environment and this one, machine first ("recorded 2 threads on ...")."""
    problems = compare_flat(recorded, now, COMPARED_ENVIRONMENT)
    if problems and _describe_machine(recorded) != _describe_machine(now):
        problems.insert(0, f"machine: recorded {_describe_machine(recorded)}, now {_describe_machine(now)}")
    return problems

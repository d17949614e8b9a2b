"""Names a package exports but imports on first use (PEP 562), so that `import hf_sift` and `hf-sift --help` stay
fast: most of the library needs torch, and the trainer, the masked model and the merging methods need transformers.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package`, each name of `names` imported from its submodule.

    Args:
        package (`str`): The package's `__name__`.
        names (`Mapping[str, str]`): Exported name -> relative module that defines it (e.g. `".merged_delta"`).

    Example:

    ```python
    __getattr__, __dir__ = lazy_exports(__name__, {"MergedDelta": ".merged_delta"})
    ```
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
            setattr(sys.modules[package], name, value)  # later look-ups skip this function
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__

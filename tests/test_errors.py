"""Every error class of hf_sift lives in `hf_sift.errors`, and none of hf_sift raises a bare ValueError, KeyError or
TypeError: each error a user can meet is a [`SiftError`] with a clear class."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import hf_sift
from hf_sift import errors


PACKAGE = Path(hf_sift.__file__).parent


def all_modules():
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="hf_sift."):
        yield importlib.import_module(info.name)


def test_every_error_class_is_defined_in_errors():
    for module in all_modules():
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__.startswith("hf_sift"):
                assert value.__module__ == "hf_sift.errors", (
                    f"{module.__name__}.{name} is defined in {value.__module__}"
                )
                assert getattr(errors, name) is value
    assert sorted(errors.__all__) == sorted(
        n for n, v in vars(errors).items() if inspect.isclass(v) and issubclass(v, BaseException)
    )


def test_errors_moved_to_errors_are_importable_where_they_were():
    from hf_sift.merging import CheckpointError, InvalidMergeParameterError, UnknownMergeMethodError
    from hf_sift.merging.registry import InvalidMergeParameterError as from_registry
    from hf_sift.merging.streaming import CheckpointError as from_streaming
    from hf_sift.trainer.sift_config import InvalidSIFTConfigError
    from hf_sift.trainer.sign_constraint import MissingReferenceError

    assert CheckpointError is from_streaming is errors.CheckpointError
    assert InvalidMergeParameterError is from_registry is errors.InvalidMergeParameterError
    assert UnknownMergeMethodError is errors.UnknownMergeMethodError
    assert InvalidSIFTConfigError is errors.InvalidSIFTConfigError
    assert MissingReferenceError is errors.MissingReferenceError


def test_every_error_is_a_sift_error_and_bad_input_is_a_value_error():
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.SiftError), name
        assert issubclass(cls, (ValueError, RuntimeError)) or cls in (errors.SiftError, errors.IntegrityError), name


def test_no_bare_builtin_errors_are_raised():
    bare = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(target, ast.Name) and target.id in ("ValueError", "KeyError", "TypeError"):
                    bare.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert bare == []

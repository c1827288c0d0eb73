"""Helpers that keep torch out of a CLI module's import, so ``--help`` prints fast (lazy ``no_grad``,
lazy aliases for moved modules)."""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def no_grad(fn: F) -> F:
    """Like ``@torch.no_grad()``, but torch is imported on the first call, not when the module loads."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class _AliasLoader(importlib.abc.Loader):
    """Loads an old module name as the module it moved to (the very same module object)."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self.own_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the moved module is already imported (it keeps its own ``__spec__``)."""
        module.__spec__ = self.own_spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds the old names of moved modules (see :func:`alias_modules`)."""

    def __init__(self, aliases: dict[str, str]):
        self.aliases = aliases

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.aliases:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(self.aliases[fullname]))


def alias_modules(package: str, moved: dict[str, str]) -> None:
    """Make ``package.<old>`` import as the module ``moved[old]`` names, on first import (not now,
    so importing ``package`` stays light: e.g. no torch for a CLI's ``--help``)."""
    aliases = {f"{package}.{old}": new for old, new in moved.items()}
    if not any(isinstance(f, _AliasFinder) and f.aliases == aliases for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder(aliases))

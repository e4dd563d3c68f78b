"""Lazy module proxies, so that heavy libraries are imported at module scope yet loaded only when first used.

The pattern (optuna's `_imports.py`): a module writes its heavy imports once, at the top,

    if TYPE_CHECKING:
        import torch
    else:
        torch = lazy_import("torch")

so type checkers and the import-graph test see real imports, and `import nas_minitron` stays light.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

__all__ = ["lazy_import"]


class _LazyModule(types.ModuleType):
    """Stands in for a module until an attribute is read; then imports it and forwards to it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_lazy_target"] = None

    def _load(self) -> types.ModuleType:
        target: types.ModuleType | None = self.__dict__["_lazy_target"]
        if target is None:
            target = importlib.import_module(self.__name__)
            self.__dict__["_lazy_target"] = target
        return target

    def __getattr__(self, item: str) -> Any:
        return getattr(self._load(), item)

    def __dir__(self) -> list[str]:
        return dir(self._load())


def lazy_import(name: str) -> Any:
    """A proxy for module `name` (dotted names work: `lazy_import("torch.nn.functional")`)."""
    return _LazyModule(name)

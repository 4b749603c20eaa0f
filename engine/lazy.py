"""Lazy package attributes (PEP 562): a package's public names, imported on first use, so
that importing one light submodule does not import torch through the package's __init__."""

from __future__ import annotations

import importlib


def lazy_names(package: str, where: dict[str, str], also=()):
    """``__getattr__`` and ``__dir__`` for ``package``: each name in ``where`` comes from the
    submodule it maps to; each name in ``also`` is a submodule itself."""

    def __getattr__(name: str):
        if name in also:
            return importlib.import_module(f".{name}", package)
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{where[name]}", package), name)

    def __dir__():
        return sorted({*where, *also})

    return __getattr__, __dir__

"""Lazy public names for a package: nothing is imported until a name is first used."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, names: dict[str, str]):
    """(__getattr__, __all__) for ``package`` exporting ``names`` (name -> module that defines it)."""

    def __getattr__(name):
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(names)

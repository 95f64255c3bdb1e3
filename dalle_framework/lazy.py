"""Module attributes imported on first use (PEP 562): what keeps ``dalle --help``, the recipe check and a
plugin's registration from importing torch, while ``from package import Name`` keeps working."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_attributes(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving each name of ``where`` from the (relative) module it maps to,
    imported only when the name is first asked for:

        __getattr__ = lazy_attributes(__name__, {"GumbelDVAE": ".model"})
    """

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        setattr(sys.modules[package], name, value)  # once loaded, a plain attribute
        return value

    return __getattr__

"""Lazy package exports: a package names its public attributes and the modules that define them, and each is
imported on first use, so ``import mmtok.<package>`` stays cheap (no torch / transformers until a name is touched).

Used by the package ``__init__`` files::

    __getattr__, __dir__ = lazy_exports(__name__, {"MLLM": "mmtok.mllm.modeling", ...})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level ``__getattr__`` and ``__dir__`` for ``package`` exporting ``names`` (attribute -> module).

    The first access imports the defining module and stores the value on the package, so later look-ups are plain
    attribute reads. An unknown name raises ``AttributeError`` as a normal module does.
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__

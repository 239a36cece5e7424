"""The MLLM (vision tower + projector + HF causal LM), visual-token pruning and text-as-mask segmentation.

The main classes are importable from here (``from mmtok.mllm import MLLM``); each is imported on first use so
``import mmtok.mllm`` stays cheap (no torch / transformers until a class is touched).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "MLLM": "mmtok.mllm.modeling",
    "MLLMConfig": "mmtok.mllm.modeling",
    "MLLMOutput": "mmtok.mllm.modeling",
    "GenerateOutput": "mmtok.mllm.modeling",
    "VisionTower": "mmtok.mllm.towers",
    "Pruner": "mmtok.mllm.pruning.base",
    "PrunerConfig": "mmtok.mllm.pruning.base",
    "PruneContext": "mmtok.mllm.pruning.base",
    "PruningError": "mmtok.mllm.pruning.base",
    "SegOutput": "mmtok.mllm.seg.heads",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

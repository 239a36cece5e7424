"""The MLLM (vision tower + projector + HF causal LM), visual-token pruning and text-as-mask segmentation.

The main classes are importable from here (``from mmtok.mllm import MLLM``); each is imported on first use so
``import mmtok.mllm`` stays cheap (no torch / transformers until a class is touched).
"""

from __future__ import annotations

from mmtok.lazy import lazy_exports

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
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

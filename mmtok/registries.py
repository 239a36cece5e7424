"""Every registry of mmtok, in one place.

Each registry is filled by the module that implements its entries. ``get(kind)`` imports those
modules on first use, so ``mmtok.registries.get("tokenizer").list()`` is complete without the caller
knowing where tokenizers live, and ``import mmtok`` itself stays free of heavy imports.
"""

from __future__ import annotations

import importlib
import logging

from mmtok.registry import Registry, RegistryError

logger = logging.getLogger(__name__)

TASKS = Registry("task")  # training tasks: task(batch) -> {"loss": ...}
SHARD_BUILDERS = Registry("shard builder")  # `mmtok shards NAME`
TOKENIZERS = Registry("tokenizer")
QUANTIZERS = Registry("quantizer")
MASKERS = Registry("masker")
MIM_MODELS = Registry("mim model")
VISION_TOWERS = Registry("vision tower")
PROJECTORS = Registry("projector")
MLLMS = Registry("mllm")
PRUNERS = Registry("pruner")
SEG_FORMATS = Registry("seg format")
SEG_HEADS = Registry("seg head")

_BY_KIND = {
    r.kind: r
    for r in (
        TASKS,
        SHARD_BUILDERS,
        TOKENIZERS,
        QUANTIZERS,
        MASKERS,
        MIM_MODELS,
        VISION_TOWERS,
        PROJECTORS,
        MLLMS,
        PRUNERS,
        SEG_FORMATS,
        SEG_HEADS,
    )
}

# Modules that fill each registry. A missing module (a capability not built yet) is skipped with a
# debug log so the rest still works.
_PROVIDERS: dict[str, tuple[str, ...]] = {
    "task": ("mmtok.train.toy", "mmtok.tokenizers.tasks", "mmtok.mim.tasks", "mmtok.mllm.tasks"),
    "shard builder": ("mmtok.data.sources", "mmtok.tokenizers.shards", "mmtok.mllm.data"),
    "tokenizer": ("mmtok.tokenizers",),
    "quantizer": ("mmtok.tokenizers.quantizers",),
    "masker": ("mmtok.mim.masking",),
    "mim model": ("mmtok.mim",),
    "vision tower": ("mmtok.mllm.towers",),
    "projector": ("mmtok.mllm.modeling",),
    "mllm": ("mmtok.mllm.modeling",),
    "pruner": ("mmtok.mllm.pruning",),
    "seg format": ("mmtok.mllm.seg",),
    "seg head": ("mmtok.mllm.seg",),
}
_loaded: set[str] = set()


def load_providers(kind: str) -> None:
    """Import the modules that register entries of ``kind`` (once)."""
    if kind in _loaded:
        return
    _loaded.add(kind)
    for module in _PROVIDERS.get(kind, ()):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            # Only swallow "this capability's module does not exist yet", never a broken import inside it.
            if e.name is None or not module.startswith(e.name):
                raise
            logger.debug("provider %s of %s registry not available: %s", module, kind, e)


def get(kind: str) -> Registry:
    """The registry of ``kind`` with all its providers imported."""
    if kind not in _BY_KIND:
        raise RegistryError(f"unknown registry kind {kind!r}; kinds: {', '.join(sorted(_BY_KIND))}")
    load_providers(kind)
    return _BY_KIND[kind]


def kinds() -> list[str]:
    return sorted(_BY_KIND)

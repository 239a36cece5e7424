"""Every registry of mmtok, in one place.

Each registry is filled by the modules that implement its entries. Those modules are imported on
demand: looking up a name imports providers in order until it is found, listing imports them all.
So ``mmtok.registries.get("tokenizer").list()`` is complete without the caller knowing where
tokenizers live, building the toy task does not import every MLLM module, and ``import mmtok``
itself stays free of heavy imports.
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
    "task": (
        "mmtok.train.toy",
        "mmtok.mim.tasks",
        "mmtok.tokenizers.tasks",
        "mmtok.mllm.tasks",
        "mmtok.mllm.seg.tasks",
        "mmtok.mllm.seg.tower",
        "mmtok.clip.tasks",
    ),
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


def _provider(kind: str, module: str):
    def load() -> None:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            # Only swallow "this capability's module does not exist", never a broken import inside it.
            if e.name is None or not module.startswith(e.name):
                raise
            logger.debug("provider %s of %s registry not available: %s", module, kind, e)

    return load


for _kind, _modules in _PROVIDERS.items():
    for _module in _modules:
        _BY_KIND[_kind].add_provider(_provider(_kind, _module))


def load_providers(kind: str) -> None:
    """Import every module that registers entries of ``kind``."""
    get(kind).load_all()


def get(kind: str) -> Registry:
    """The registry of ``kind``; its provider modules are imported on demand by lookups and listings."""
    if kind not in _BY_KIND:
        raise RegistryError(f"unknown registry kind {kind!r}; kinds: {', '.join(sorted(_BY_KIND))}")
    return _BY_KIND[kind]


def kinds() -> list[str]:
    return sorted(_BY_KIND)

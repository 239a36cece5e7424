"""Visual-token pruning for the MLLM: one interface (:mod:`.base`), one module per method.

Importing this package registers every pruner in ``mmtok.registries.PRUNERS``:
``none``, ``random``, ``pool`` (baselines), ``cls_attention`` (FasterVLM), ``vtc_cls`` (VTC-CLS), ``fastv``,
``dart``. Build one with ``registries.get("pruner").create("dart", num_keep=64)``.
"""

from mmtok.mllm.pruning import baselines, cls_attention, dart, fastv  # noqa: F401  (registration)
from mmtok.mllm.pruning.base import PruneContext, Pruner, PrunerConfig, PruningError, topk_sorted

__all__ = ["PruneContext", "Pruner", "PrunerConfig", "PruningError", "topk_sorted"]

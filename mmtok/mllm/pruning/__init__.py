"""Visual-token pruning for the MLLM: one interface (:mod:`.base`), one module per method.

Importing this package registers every pruner in ``mmtok.registries.PRUNERS``:
``none``, ``random``, ``pool`` (baselines), ``cls_attention`` (FasterVLM), ``vtc_cls`` (VTC-CLS), ``fastv``,
``dart`` (selecting pruners, ``kind = "select"``) and ``tome``, ``pitome`` (merging reducers, ``kind = "merge"``,
:class:`Merger`: ``merge(ctx) -> MergeResult``). Build one with
``registries.get("pruner").create("dart", num_keep=64)``; every pruner but ``none``
needs a budget (``num_keep >= 1`` or ``keep_ratio`` in (0, 1]; FastV defaults to ``keep_ratio=0.5``).
"""

from mmtok.mllm.pruning import baselines, cls_attention, dart, fastv, merge  # noqa: F401  (registration)
from mmtok.mllm.pruning.base import (
    BUDGET_HELP,
    Merger,
    MergeResult,
    PruneContext,
    Pruner,
    PrunerConfig,
    PruningError,
    check_budget,
    merge_slots,
    topk_sorted,
)

__all__ = [
    "BUDGET_HELP",
    "MergeResult",
    "Merger",
    "PruneContext",
    "Pruner",
    "PrunerConfig",
    "PruningError",
    "check_budget",
    "merge_slots",
    "topk_sorted",
]

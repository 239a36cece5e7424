"""The one interface every visual-token pruner implements.

A pruner declares *where* it acts (``stage = "pre_llm"``: on the projected image features before the LLM;
``stage = "in_llm"``: at the input of LLM layer ``layer``) and implements ``select(ctx) -> keep [B, K]``: sorted
indices into the ``N`` image tokens of each sample. It modifies nothing; the MLLM applies the same indices to
the hidden states, attention mask, position ids (original positions kept), labels and KV cache. Every score a
pruner needs is requested lazily from :class:`PruneContext`, so a pruner that needs no attention pays for none.

Budgets: ``num_keep`` (tokens kept per image, >= 1) or ``keep_ratio`` (fraction of the ``N`` image tokens, in
(0, 1]); exactly one of them. Zero is rejected everywhere with the same message (:data:`BUDGET_HELP`): it used to
mean "keep everything" for most pruners and 50% for FastV. To keep every token use the ``none`` pruner, the only
one that needs no budget (it accepts one and ignores it, so callers can pass the same arguments to every pruner).

Two kinds of reducer share this interface (``kind``): a *selecting* pruner (``kind = "select"``) keeps a subset and
drops the rest; a *merging* reducer (``kind = "merge"``, :class:`Merger`) also implements
``merge(ctx) -> MergeResult`` (merged features ``[B, K, D]``, their sizes ``[B, K]`` and the source map
``[B, N] -> 0..K-1``) and plugs into the same pre-LLM hook: ``select`` returns the slot of each merged token (where it
sits in the sequence, hence its position id) and ``gather_features`` the merged features for those slots.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class PruningError(ValueError):
    """A pruner config or call that cannot work (with what to change)."""


BUDGET_HELP = (
    "set exactly one budget: num_keep (image tokens kept per image, an integer >= 1) or keep_ratio (share of the "
    "image tokens kept, in (0, 1]); 0 does not mean 'keep everything': use the 'none' pruner for that"
)


@dataclass
class PrunerConfig:
    """Budget shared by every pruner: exactly one of ``num_keep`` (>= 1) or ``keep_ratio`` (in (0, 1]).

    ``None`` = not set. The ``none`` pruner needs neither; FastV defaults to ``keep_ratio=0.5``.
    """

    num_keep: int | None = None
    keep_ratio: float | None = None
    seed: int = 0


def check_budget(config: PrunerConfig, name: str, required: bool = True) -> None:
    """Raise :class:`PruningError` (one message for every pruner) unless the budget in ``config`` is usable.

    Args:
        config: The pruner's config.
        name: The pruner's name, for the message.
        required: False for pruners that ignore the budget (``none``): then no budget is fine, but a given
            one must still be valid.
    """
    nk, kr = config.num_keep, config.keep_ratio
    ok = True
    if nk is not None and kr is not None:
        ok = False
    elif nk is None and kr is None:
        ok = not required
    elif nk is not None:
        try:  # an int (numpy ints too) but not a bool and not a float such as 64.0
            ok = not isinstance(nk, bool) and operator.index(nk) >= 1
        except TypeError:
            ok = False
    else:
        ok = isinstance(kr, (int, float)) and not isinstance(kr, bool) and 0.0 < float(kr) <= 1.0
    if not ok:
        raise PruningError(f"{name}: {BUDGET_HELP}; got num_keep={nk!r}, keep_ratio={kr!r}")


@dataclass
class PruneContext:
    """What the MLLM knows when a pruner runs (fields not available at a stage are None).

    Shapes: ``B`` batch, ``N`` image tokens per sample, ``L`` sequence length, ``D`` width.
    """

    num_image_tokens: int
    image_features: torch.Tensor | None = None  # pre_llm: projected features [B, N, D]
    grid: tuple[int, int] | None = None  # (rows, cols) of the image tokens
    # pre_llm, vision tower side
    tower: Any = None
    tower_hidden: list[torch.Tensor] | None = None  # hidden_states of the tower (index 0 = embeddings)
    feature_block: int = -1  # tower block whose output feeds the LLM (0-based)
    # True when the caller applies a merger's proportional-attention bias (decoder.run_layers key_bias)
    accepts_key_bias: bool = False
    # in_llm side
    llm: Any = None
    layer: int = -1  # the layer K at whose input we prune
    hidden: torch.Tensor | None = None  # input of layer K [B, L, D]
    image_positions: torch.Tensor | None = None  # [B, N] sequence index of each image token
    key_valid: torch.Tensor | None = None  # [B, L] real tokens
    position_ids: torch.Tensor | None = None  # [B, L]
    lazy: dict[str, Callable[[], Any]] = field(default_factory=dict)
    _memo: dict[str, Any] = field(default_factory=dict)

    def get(self, what: str) -> Any:
        """A lazily computed quantity: ``"prev_keys"`` (layer K-1 post-RoPE keys ``[B, H_kv, L, d]``),
        ``"last_attention"`` (layer K-1 attention of the last token ``[B, H, L]``),
        ``"cls_attention:<a>:<b>"`` (tower [CLS] row summed over blocks a..b, ``[B, N]``)."""
        if what not in self._memo:
            if what.startswith("cls_attention:"):
                from mmtok.mllm.towers import cls_attention_row

                _, a, b = what.split(":")
                if self.tower is None or self.tower_hidden is None:
                    raise PruningError("cls_attention needs the vision tower: it is a pre_llm pruner")
                rows = [cls_attention_row(self.tower, self.tower_hidden, blk) for blk in range(int(a), int(b) + 1)]
                self._memo[what] = torch.stack(rows).sum(0)
            elif what in self.lazy:
                self._memo[what] = self.lazy[what]()
            else:
                raise PruningError(f"{what!r} is not available at this stage; available: {sorted(self.lazy)}")
        return self._memo[what]


def check_layer(layer: int, name: str) -> None:
    """An in-LLM pruner's layer K must be an integer >= 1: it prunes at the input of layer K from layer K-1's state."""
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
        raise PruningError(
            f"{name}: layer must be an integer >= 1 (it prunes at the input of LLM layer K using layer K-1); "
            f"got {layer!r}"
        )


class Pruner:
    """Base class of registered pruners.

    Subclasses set ``stage`` ("pre_llm" or "in_llm"), ``layer`` (LLM layer K for in_llm) and implement
    :meth:`select`.
    """

    stage: str = "pre_llm"
    layer: int = 0
    needs_budget: bool = True  # False only for the identity (``none``)
    kind: str = "select"  # "select": keeps a subset; "merge": a :class:`Merger` (merged tokens stand for groups)

    def __init__(self, config: PrunerConfig):
        check_budget(config, type(self).__name__, required=self.needs_budget)
        self.config = config

    def budget(self, n: int) -> int:
        """Image tokens to keep out of ``n``: ``num_keep`` or ``ceil(keep_ratio * n)``, clamped to ``[1, n]``."""
        c = self.config
        if c.num_keep is not None:
            k = operator.index(c.num_keep)
        elif c.keep_ratio is not None:
            k = int(math.ceil(c.keep_ratio * n - 1e-9))
        else:  # only pruners with needs_budget=False get here
            k = n
        return max(1, min(n, k))

    def keeps_all(self, n: int) -> bool:
        return self.budget(n) >= n

    def select(self, ctx: PruneContext) -> torch.Tensor:  # pragma: no cover - abstract
        """Sorted keep indices ``[B, K]`` into the ``N`` image tokens."""
        raise NotImplementedError

    def gather_features(self, features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The features the kept slots carry ``[B, K, D]``; plain gather (``pool`` averages its cells instead)."""
        return features.gather(1, keep[..., None].expand(-1, -1, features.shape[-1]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(stage={self.stage!r}, layer={self.layer}, {self.config})"


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``scores [B, N]`` per row, in ascending (raster) order -> ``[B, k]``.

    Ties are broken towards the lower index so equal scores give deterministic choices.
    """
    n = scores.shape[1]
    # a tiny index-dependent offset makes ties resolve to the earlier token on every backend
    tie = torch.arange(n, device=scores.device, dtype=torch.float64) * (-1e-12)
    idx = torch.topk(scores.double() + tie, k, dim=1).indices
    return idx.sort(dim=1).values


@dataclass
class MergeResult:
    """What a merging reducer returns: ``K`` merged tokens standing for the ``N`` image tokens.

    Attributes:
        features: ``[B, K, D]`` size-weighted means of the tokens each merged token covers.
        sizes: ``[B, K]`` float, how many of the ``N`` original tokens each merged token covers (>= 1, rows sum to N).
        source_map: ``[B, N]`` long in ``0..K-1``: the merged token each original token went into (covers every
            patch, so per-patch heads and overlays can read merged outputs back per patch: :meth:`unmerge`).
    """

    features: torch.Tensor
    sizes: torch.Tensor
    source_map: torch.Tensor

    def mean_positions(self) -> torch.Tensor:
        """``[B, K]`` float: the size-weighted mean index (0..N-1) of the original tokens in each merged token."""
        b, n = self.source_map.shape
        idx = torch.arange(n, device=self.source_map.device, dtype=torch.float64).expand(b, -1)
        total = torch.zeros(b, self.sizes.shape[1], dtype=torch.float64, device=idx.device)
        total.scatter_add_(1, self.source_map, idx)
        return total / self.sizes.double()

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """Values per merged token ``[B, K, ...]`` -> per original token ``[B, N, ...]`` (a patch reads its group)."""
        index = self.source_map.reshape(*self.source_map.shape, *([1] * (x.ndim - 2)))
        return x.gather(1, index.expand(-1, -1, *x.shape[2:]))


class Merger(Pruner):
    """Base class of merging reducers (``kind = "merge"``): implement :meth:`merge`.

    The MLLM applies a merger through the pre-LLM pruning hook: :meth:`select` merges and returns the sorted slots
    ``[B, K]`` of the merged tokens (:func:`merge_slots`: the rounded mean position of what each one covers), and
    :meth:`gather_features` returns the merged features for exactly those slots. The last result is kept on
    :attr:`last_result` (for overlays, per-patch heads and the tests).
    """

    kind = "merge"
    stage = "pre_llm"

    def __init__(self, config: PrunerConfig):
        super().__init__(config)
        self.last_result: MergeResult | None = None
        self._last_slots: torch.Tensor | None = None

    def merge(self, ctx: PruneContext) -> MergeResult:  # pragma: no cover - abstract
        raise NotImplementedError

    proportional_attention: bool = False  # wants log(size) added to the LLM's attention logits of merged keys

    def select(self, ctx: PruneContext) -> torch.Tensor:
        if self.proportional_attention and not ctx.accepts_key_bias:
            # refusing beats a silent no-op: the caller would believe the merged tokens were size-weighted
            raise PruningError(
                f"{type(self).__name__}: proportional_attention=True needs the caller to add the merged tokens' "
                "log(size) to the LLM's attention mask (mmtok.mllm.decoder.run_layers key_bias, built by "
                "mmtok.mllm.pruning.merge.merge_key_bias) and to say so with PruneContext.accepts_key_bias; this "
                "caller does not: use proportional_attention=False here, or run the merger through an MLLM"
            )
        result = self.merge(ctx)
        slots = merge_slots(result)
        self.last_result, self._last_slots = result, slots
        return slots

    def gather_features(self, features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self._last_slots is None or self.last_result is None or not torch.equal(keep, self._last_slots):
            raise PruningError(
                f"{type(self).__name__}: gather_features must follow select() on the same images (a merger's features "
                "are the merged groups of its last select); call select(ctx) first"
            )
        return self.last_result.features


def merge_slots(result: MergeResult) -> torch.Tensor:
    """Sorted, distinct slots ``[B, K]`` in ``0..N-1`` for merged tokens ordered by mean position.

    The rule (documented in :mod:`mmtok.mllm.pruning.merge`): slot ``k`` is ``floor(m_k + 0.5)`` of the mean position
    ``m_k``; when two merged tokens round to the same index the later one moves to the next free index
    (``s_k = k + cummax(d_j - j)``), and never past ``N - K + k`` so that all ``K`` fit. The merged tokens must be
    sorted by mean position (what :class:`Merger` implementations return).
    """
    b, n = result.source_map.shape
    k = result.sizes.shape[1]
    desired = torch.floor(result.mean_positions() + 0.5).long()  # [B, K]
    ar = torch.arange(k, device=desired.device)
    slots = ar + torch.cummax(desired - ar, dim=1).values
    return torch.minimum(slots, (n - k) + ar).clamp(min=0)

"""The one interface every visual-token pruner implements.

A pruner declares *where* it acts (``stage = "pre_llm"``: on the projected image features before the LLM;
``stage = "in_llm"``: at the input of LLM layer ``layer``) and implements ``select(ctx) -> keep [B, K]``: sorted
indices into the ``N`` image tokens of each sample. It modifies nothing; the MLLM applies the same indices to
the hidden states, attention mask, position ids (original positions kept), labels and KV cache. Every score a
pruner needs is requested lazily from :class:`PruneContext`, so a pruner that needs no attention pays for none.

Budgets: ``num_keep`` (tokens kept per image) or ``keep_ratio`` (fraction of the ``N`` image tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class PruningError(ValueError):
    """A pruner config or call that cannot work (with what to change)."""


@dataclass
class PrunerConfig:
    """Budget shared by every pruner: set exactly one of ``num_keep`` (> 0) or ``keep_ratio`` (in (0, 1])."""

    num_keep: int = 0
    keep_ratio: float = 0.0
    seed: int = 0


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


class Pruner:
    """Base class of registered pruners.

    Subclasses set ``stage`` ("pre_llm" or "in_llm"), ``layer`` (LLM layer K for in_llm) and implement
    :meth:`select`.
    """

    stage: str = "pre_llm"
    layer: int = 0

    def __init__(self, config: PrunerConfig):
        if config.num_keep and config.keep_ratio:
            raise PruningError("set num_keep or keep_ratio, not both")
        if config.num_keep < 0 or not 0.0 <= config.keep_ratio <= 1.0:
            raise PruningError(
                f"num_keep must be >= 0 and keep_ratio in [0, 1]; got {config.num_keep}, {config.keep_ratio}"
            )
        self.config = config

    def budget(self, n: int) -> int:
        """Image tokens to keep out of ``n`` (at least 1, at most ``n``; 0/0 settings keep everything)."""
        c = self.config
        if c.num_keep:
            k = c.num_keep
        elif c.keep_ratio:
            k = int(math.ceil(c.keep_ratio * n - 1e-9))
        else:
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

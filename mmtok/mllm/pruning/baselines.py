"""Baselines every token-pruning paper compares against: no pruning, random keep, spatial pooling.

* ``none``: keeps every image token (the identity; useful to time the pruning plumbing).
* ``random``: a seeded random subset. The same subset is used for every image of a call, so the choice does
  not depend on how samples are batched (batch of 3 == three batch-1 runs).
* ``pool``: spatial average pooling of the ``g x g`` patch grid to the budget, as in the pooling baselines of
  FasterVLM (arXiv:2412.01818) and DART (arXiv:2502.11494). The budget ``K`` is factored into an ``r x c``
  output grid (r <= c, as square as possible, both <= g); cells follow ``adaptive_avg_pool2d``'s boundaries.
  To fit the one-interface rule (keep indices into the sequence), each cell keeps the slot of its centre token
  and carries the cell's mean feature (:meth:`gather_features`). A budget with no such factorisation uses the
  smallest near-square grid with at least K cells and keeps its first K cells in raster order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmtok.mllm.pruning.base import PruneContext, Pruner, PrunerConfig, PruningError
from mmtok.registries import PRUNERS


@PRUNERS.register("none", config=PrunerConfig, help="keep every image token")
class NoPruner(Pruner):
    """Identity: keeps all ``N`` image tokens (needs no budget; a given one must be valid and is ignored)."""

    stage = "pre_llm"
    needs_budget = False

    def budget(self, n: int) -> int:
        return n

    def select(self, ctx: PruneContext) -> torch.Tensor:
        b = ctx.image_features.shape[0]
        return torch.arange(ctx.num_image_tokens, device=ctx.image_features.device).expand(b, -1)


@PRUNERS.register("random", config=PrunerConfig, help="seeded random subset of the image tokens")
class RandomPruner(Pruner):
    """Keeps a seeded random subset of ``K`` image tokens (the same subset for every image of the call)."""

    stage = "pre_llm"

    def select(self, ctx: PruneContext) -> torch.Tensor:
        n, k = ctx.num_image_tokens, self.budget(ctx.num_image_tokens)
        gen = torch.Generator().manual_seed(self.config.seed)
        idx = torch.randperm(n, generator=gen)[:k].sort().values
        return idx.to(ctx.image_features.device).expand(ctx.image_features.shape[0], -1)


def _pool_grid(k: int, g: int) -> tuple[int, int]:
    """Output grid ``(r, c)`` for ``k`` cells on a ``g x g`` grid: ``r * c == k`` if possible, near square."""
    for r in range(int(math.isqrt(k)), 0, -1):
        if k % r == 0 and k // r <= g:
            return r, k // r
    r = min(g, math.ceil(math.sqrt(k)))
    return r, min(g, math.ceil(k / r))


def _bounds(i: int, n_out: int, n_in: int) -> tuple[int, int]:
    """adaptive_avg_pool's region ``[start, end)`` of output cell ``i``."""
    return (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)


@dataclass
class PoolConfig(PrunerConfig):
    pass


@PRUNERS.register("pool", config=PoolConfig, help="spatial average pooling of the patch grid to the budget")
class PoolPruner(Pruner):
    """Average pooling to ``K`` cells; each kept slot is its cell's centre token carrying the cell's mean."""

    stage = "pre_llm"

    @staticmethod
    def cells(k: int, g: int) -> list[tuple[int, int, int, int]]:
        """``k`` pooling cells ``(row0, row1, col0, col1)`` (ends exclusive) on a ``g x g`` grid, raster order."""
        r, c = _pool_grid(k, g)
        return [(*_bounds(i, r, g), *_bounds(j, c, g)) for i in range(r) for j in range(c)][:k]

    def select(self, ctx: PruneContext) -> torch.Tensor:
        if ctx.grid is None or ctx.grid[0] != ctx.grid[1]:
            raise PruningError("pool needs a square patch grid: use feature_select='patch' (no [CLS] token)")
        g = ctx.grid[0]
        cells = self.cells(self.budget(ctx.num_image_tokens), g)
        reps = [((r0 + r1 - 1) // 2) * g + (c0 + c1 - 1) // 2 for r0, r1, c0, c1 in cells]
        idx = torch.tensor(reps, device=ctx.image_features.device)
        return idx.expand(ctx.image_features.shape[0], -1)

    def gather_features(self, features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        g = math.isqrt(features.shape[1])
        grid = features.view(features.shape[0], g, g, -1)  # [B, g, g, D]
        means = [grid[:, r0:r1, c0:c1].mean(dim=(1, 2)) for r0, r1, c0, c1 in self.cells(keep.shape[1], g)]
        return torch.stack(means, dim=1)  # [B, K, D]

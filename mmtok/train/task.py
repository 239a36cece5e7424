"""The contract between the training engine and what it trains.

A :class:`Task` is an ``nn.Module`` holding a model and its loss. The engine only ever calls
``task(batch)`` and reads the returned dict: ``"loss"`` (a scalar tensor to minimise) plus any other
scalars to log. Everything task-specific (what a sample becomes, how a batch is collated, what
evaluation means, what is exported at the end) is a hook here, so the engine never needs to know
whether it trains a tokenizer, an MAE or an MLLM.

Samples arrive from :mod:`mmtok.data` already decoded (see ``mmtok/data/README`` in the reader's
docstring): ``image`` float ``[C, H, W]`` in [0, 1], ``mask`` long ``[H, W]``, ``video`` float
``[C, T, H, W]`` in [0, 1], ``codes`` long, ``label`` int, ``json`` dict, ``__key__`` str.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate


class Task(nn.Module):
    """Base class of every training task (registered in ``mmtok.registries.TASKS``)."""

    config: Any

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- data hooks ---------------------------------------------------------------------------
    def sample_transform(self, split: str) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        """Per-sample map applied in the data workers (``split`` is "train" or "val")."""
        return None

    def collate(self, samples: list[dict[str, Any]]) -> Any:
        """Batch samples: tensors and numbers are stacked, other values kept as lists."""
        keys = samples[0].keys()
        out: dict[str, Any] = {}
        for k in keys:
            vals = [s[k] for s in samples]
            if isinstance(vals[0], (torch.Tensor, int, float)):
                out[k] = default_collate(vals)
            else:
                out[k] = vals
        return out

    # -- evaluation and export ----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]:
        """Default evaluation: the mean of every scalar returned by ``forward`` over ``batches``."""
        sums: dict[str, float] = {}
        n = 0
        for batch in batches:
            out = self(batch)
            for k, v in out.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        return {k: v / max(n, 1) for k, v in sums.items()}

    def export(self, out_dir: str | Path) -> None:
        """Save the trained artefact (hub format) under ``out_dir``; default: nothing."""

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups: no weight decay on biases, norms and embeddings-like 1-D params."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

"""Exponential moving average of a task's weights (``train.ema_decay``).

After every optimizer step the average moves towards the live weights: ``avg += (1 - d) * (w - avg)`` with
``d = min(decay, (1 + n) / (10 + n))`` after ``n`` earlier updates, so the first updates follow the weights closely
and the average forgets the initial weights within tens of steps instead of ``1 / (1 - decay)`` (the warm-up of
TensorFlow's ``ExponentialMovingAverage(num_updates=...)``, also timm's ``ModelEmaV3`` option). The average is kept
in float32 for every trainable parameter and floating-point buffer (one copy of what trains), on the model's device.

The live weights train, checkpoint and resume as before; the average is saved beside them in each checkpoint
(``ema.safetensors``, with the update count in ``trainer_state.json``) so a resumed run continues it exactly, and
it is what evaluation and the export see (:meth:`WeightEMA.applied`). Under ZeRO-3 the parameters are partitioned
across ranks and the engine refuses the option.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from mmtok.hub import CheckpointError

EMA_NAME = "ema.safetensors"


def _tracked(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters (tied ones once) and floating-point buffers by name: what the average follows. Frozen
    parameters never change, so their average is themselves: a LoRA run keeps no copy of its frozen base model."""
    out = {n: p for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()}
    out.update({n: b for n, b in model.named_buffers() if b.is_floating_point()})
    return out


@torch.no_grad()
def _copy_into(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Overwrite ``model``'s tracked tensors with ``values`` (same names; cast to each tensor's dtype)."""
    for name, t in _tracked(model).items():
        t.copy_(values[name])


class WeightEMA:
    """The average of ``model``'s weights (see the module docstring)."""

    def __init__(self, model: nn.Module, decay: float):
        if not (0.0 < decay < 1.0 and math.isfinite(decay)):
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {n: t.detach().float().clone() for n, t in _tracked(model).items()}

    def current_decay(self) -> float:
        """The decay of the next update (warm-up over the first updates, then ``decay``)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, t in _tracked(model).items():
            self.shadow[name].lerp_(t.detach().float(), weight)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """``model`` holds the averaged weights inside the block and its own ones again after it (bit for bit)."""
        backup = {n: t.detach().clone() for n, t in _tracked(model).items()}
        try:
            _copy_into(model, self.shadow)
            yield
        finally:
            _copy_into(model, backup)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        tensors = {n: t.contiguous().cpu() for n, t in self.shadow.items()}
        save_file(tensors, str(folder / EMA_NAME), metadata={"updates": str(self.updates), "decay": repr(self.decay)})

    def load(self, folder: Path, updates: int) -> None:
        """The average saved in ``folder`` (names and shapes must match the model's); ``updates`` from its state."""
        for name, t in read_average(folder, self.shadow).items():
            self.shadow[name].copy_(t)
        self.updates = int(updates)


def read_average(folder: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weight average saved in checkpoint ``folder``, checked against ``like`` (same names and shapes)."""
    from safetensors.torch import load_file

    saved = load_file(str(folder / EMA_NAME))
    missing, extra = sorted(set(like) - set(saved)), sorted(set(saved) - set(like))
    if missing or extra:
        raise CheckpointError(
            f"{folder / EMA_NAME} does not match the model (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for name, t in like.items():
        if saved[name].shape != t.shape:
            raise CheckpointError(
                f"{folder / EMA_NAME}: {name} has shape {tuple(saved[name].shape)}, not {tuple(t.shape)}"
            )
    return saved


def load_average_into(model: nn.Module, folder: Path) -> None:
    """Overwrite ``model``'s weights with the average saved in checkpoint ``folder`` (``mmtok eval run``)."""
    _copy_into(model, read_average(folder, _tracked(model)))

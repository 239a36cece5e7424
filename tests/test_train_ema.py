"""The weight average (``train.ema_decay``, mmtok/train/ema.py): its arithmetic, swapping it in and out, and its
checkpoint file. The engine's use of it (resume, evaluation, export) is checked in test_train_resume.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmtok.hub import CheckpointError
from mmtok.train.ema import WeightEMA, load_average_into


def test_average_follows_the_documented_recurrence():
    m = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = WeightEMA(m, decay=0.9)
    expected = torch.zeros(1, 2)
    for n, value in enumerate([1.0, 2.0, 4.0, -1.0, 3.0] * 20):
        with torch.no_grad():
            m.weight.fill_(value)
        d = min(0.9, (1 + n) / (10 + n))  # warm-up, then the decay
        expected = d * expected + (1 - d) * value
        ema.update(m)
    assert ema.updates == 100 and ema.current_decay() == 0.9
    torch.testing.assert_close(ema.shadow["weight"], expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(m, decay=1.0)


def test_applied_swaps_in_the_average_and_restores_every_bit(tmp_path):
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    m[2].weight = m[0].weight  # tied: averaged once, under its first name
    m.train()
    ema = WeightEMA(m, decay=0.5)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        m(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        ema.update(m)
    assert "1.running_mean" in ema.shadow and "1.num_batches_tracked" not in ema.shadow  # float buffers only
    assert "2.weight" not in ema.shadow
    live = {k: v.clone() for k, v in m.state_dict().items()}
    with ema.applied(m):
        inside = {k: v.clone() for k, v in m.state_dict().items()}
    after = m.state_dict()
    assert all(torch.equal(after[k], live[k]) for k in live)
    assert not torch.equal(inside["0.weight"], live["0.weight"])
    torch.testing.assert_close(inside["0.weight"], ema.shadow["0.weight"])
    assert torch.equal(inside["1.running_mean"], ema.shadow["1.running_mean"])
    # the checkpoint file: saved, read back into a fresh average and into a model
    ema.save(tmp_path)
    again = WeightEMA(m, decay=0.5)
    again.load(tmp_path, updates=ema.updates)
    assert again.updates == 5 and all(torch.equal(again.shadow[k], ema.shadow[k]) for k in ema.shadow)
    fresh = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    fresh[2].weight = fresh[0].weight
    load_average_into(fresh, tmp_path)
    assert torch.equal(fresh[2].weight, inside["0.weight"]) and torch.equal(fresh[2].bias, inside["2.bias"])
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_average_into(nn.Linear(3, 4), tmp_path)


def test_frozen_parameters_are_not_copied():
    """A frozen part (a LoRA run's base model) never changes: the average keeps no copy of it and leaves it alone."""
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    m[0].requires_grad_(False)
    ema = WeightEMA(m, decay=0.9)
    assert set(ema.shadow) == {"1.weight", "1.bias"}
    with torch.no_grad():
        m[1].weight.add_(1.0)
    ema.update(m)
    frozen = m[0].weight.clone()
    with ema.applied(m):
        assert torch.equal(m[0].weight, frozen)

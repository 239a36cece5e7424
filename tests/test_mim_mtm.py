"""Masked token modeling: loss on hidden codes, cosine schedule, MaskGIT decoding and inpainting."""

from __future__ import annotations

import math

import pytest
import torch

from mmtok import registries
from mmtok.mim import MTM
from mmtok.mim.mtm import cosine_schedule

V, H, W = 16, 4, 4


def _mtm(**kw) -> MTM:
    return registries.get("mim model").create("mtm_micro", codebook_size=V, grid_h=H, grid_w=W, **kw)


def test_loss_only_on_hidden_codes():
    model = _mtm(label_smoothing=0.0)
    codes = torch.randint(0, V, (3, H, W))
    mask = torch.zeros(3, H * W, dtype=torch.bool)
    mask[:, :5] = True
    out = model(codes, mask)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :5].reshape(-1, V), codes.view(3, -1)[:, :5].reshape(-1))
    assert torch.allclose(out.loss, ce, atol=1e-5)
    # hidden positions get the [MASK] id as input: the visible codes alone drive the prediction
    changed = codes.clone().view(3, -1)
    changed[:, :5] = (changed[:, :5] + 1) % V
    assert torch.allclose(model(changed.view(3, H, W), mask).logits, out.logits, atol=1e-6)


def test_cosine_schedule_and_training_masks():
    assert cosine_schedule(0.0) == 1.0 and abs(cosine_schedule(1.0)) < 1e-12
    assert cosine_schedule(0.5) == pytest.approx(math.cos(math.pi / 4))
    model = _mtm()
    m = model.random_mask(512, torch.device("cpu"), torch.Generator().manual_seed(0))
    frac = m.float().mean(1)
    assert (m.sum(1) >= 1).all()
    # E[cos(pi/2 u)] = 2/pi for u ~ U(0, 1)
    assert frac.mean().item() == pytest.approx(2 / math.pi, abs=0.05)


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_maskgit_decoding_leaves_no_mask(steps):
    model = _mtm().eval()
    ids = model.generate(4, steps=steps, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (4, H * W)
    assert (ids != model.mask_id).all() and ids.min() >= 0 and ids.max() < V


def test_inpainting_keeps_known_codes():
    model = _mtm().eval()
    codes = torch.randint(0, V, (3, H * W))
    known = torch.rand(3, H * W) < 0.5
    out = model.generate(codes=codes, known=known, steps=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[known], codes[known]) and (out != model.mask_id).all()


def test_learns_a_deterministic_code_pattern():
    """A tiny run: loss falls and hidden-code accuracy rises on a learnable pattern."""
    torch.manual_seed(0)
    model = _mtm(label_smoothing=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    base = torch.arange(H * W) % V
    losses = []
    for _ in range(250):
        shift = torch.randint(0, V, (32, 1))
        codes = (base[None] + shift) % V  # each grid is a shifted ramp: visible codes predict hidden ones
        out = model(codes.view(32, H, W))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    # grids with every code hidden cannot be predicted (about a third of hidden tokens): floor ~0.9
    assert last < 0.6 * first
    sample = model.eval().generate(8, steps=6, generator=torch.Generator().manual_seed(0))
    # generated grids follow the pattern: consecutive codes differ by 1 (mod V) far above chance
    assert ((sample[:, 1:] - sample[:, :-1]) % V == 1).float().mean() > 0.3  # chance: 1/16


def test_decode_pixels_uses_tokenizer_and_bad_codes_fail():
    class FakeTok:  # any object with decode_indices works; this one maps ids to grey levels
        def decode_indices(self, ids):
            return (ids.float() / (V - 1) * 2 - 1)[:, None].repeat_interleave(2, -1).repeat_interleave(2, -2)

    ids = torch.randint(0, V, (2, H * W))
    img = MTM.decode_pixels(FakeTok(), ids, (H, W))
    assert img.shape == (2, 1, 8, 8) and img.min() >= 0 and img.max() <= 1
    with pytest.raises(TypeError, match="decode_indices"):
        MTM.decode_pixels(object(), ids, (H, W))
    model = _mtm()
    with pytest.raises(ValueError, match="codebook_size"):
        model(torch.full((1, H, W), V + 3))
    with pytest.raises(ValueError, match="grid"):
        model(torch.zeros(1, 5, dtype=torch.long))

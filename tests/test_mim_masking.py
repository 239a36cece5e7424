"""Properties every masker must have, looped over the registry, plus per-strategy invariants."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from scipy import ndimage

from mmtok import registries
from mmtok.mim.masking import (
    MaskContext,
    adaptive_sampling_loss,
    beit_block_mask,
    mask_to_output,
    num_visible,
    ranking_loss,
)

MASKERS = registries.get("masker")
GRIDS = [(1, 7, 7), (2, 4, 4), (4, 8, 8)]
RATIOS = [0.5, 0.75]


def _make(name: str, ratio: float, dim: int = 16):
    extra = {"embed_dim": dim, "num_heads": 2} if name == "adaptive" else {}
    return MASKERS.create(name, mask_ratio=ratio, **extra)


def _ctx(grid, batch=5, dim=16, progress=0.5, seed=0):
    n = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(seed)
    return MaskContext(
        grid=grid,
        tokens=torch.randn(batch, n, dim, generator=g),
        scores=torch.rand(batch, n, generator=g),
        progress=progress,
        generator=torch.Generator().manual_seed(seed + 1),
    )


def test_all_strategies_registered():
    assert set(MASKERS.list()) >= {"random", "block", "tube", "attention", "adaptive", "hard_patch"}


@pytest.mark.parametrize("name", MASKERS.list())
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_exact_counts_and_restore_inverts_keep(name, grid, ratio):
    b = 5
    ctx = _ctx(grid, b)
    n = ctx.num_tokens
    masker = _make(name, ratio)
    out = masker(b, ctx)
    k = masker.visible_count(grid)
    t, h, w = grid
    if name == "tube":  # VideoMAE: int(ratio * h*w) hidden in every frame
        assert k == t * (h * w - int(ratio * h * w))
    elif name == "block":  # the MAE formula per frame (= MAE's on images)
        assert k == t * int(h * w * (1 - ratio))
    else:
        assert k == int(n * (1 - ratio))
    assert out.mask.shape == (b, n) and out.mask.dtype == torch.bool
    assert out.ids_keep.shape == (b, k) and out.ids_restore.shape == (b, n)
    assert ((~out.mask).sum(1) == k).all()
    # kept ids are exactly the visible tokens, without repeats
    assert (~out.mask).gather(1, out.ids_keep).all()
    assert all(len(set(row.tolist())) == k for row in out.ids_keep)
    # ids_restore is a permutation whose inverse starts with ids_keep and then lists the hidden tokens
    shuffle = torch.argsort(out.ids_restore, dim=1)
    assert torch.equal(shuffle[:, :k], out.ids_keep)
    assert out.mask.gather(1, shuffle[:, k:]).all()
    # un-shuffling "visible first" values puts every token back in place
    tokens = torch.arange(n).expand(b, n)
    assert torch.equal(torch.gather(torch.gather(tokens, 1, shuffle), 1, out.ids_restore), tokens)


def test_num_visible_formula_and_errors():
    assert num_visible(49, 0.75) == 12 and num_visible(196, 0.9) == 19 and num_visible(16, 0.75) == 4
    with pytest.raises(ValueError, match="mask_ratio"):
        num_visible(10, 0.99)
    with pytest.raises(ValueError, match="mask_ratio"):
        num_visible(10, 1.0)


def test_random_masks_differ_per_sample_and_are_seeded():
    a = _make("random", 0.75)(4, _ctx((1, 8, 8), 4, seed=3))
    b = _make("random", 0.75)(4, _ctx((1, 8, 8), 4, seed=3))
    assert torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask[0], a.mask[1])


@pytest.mark.parametrize("name", ["tube", "block"])
def test_tube_and_block_masks_identical_over_time(name):
    grid = (4, 6, 6)
    out = _make(name, 0.75)(3, _ctx(grid, 3))
    per_t = out.mask.view(3, 4, 36)
    assert (per_t == per_t[:, :1]).all()
    assert not torch.equal(per_t[0, 0], per_t[1, 0])  # but different per sample


@pytest.mark.parametrize(
    "grid, ratio, per_frame",
    [((8, 14, 14), 0.9, 20), ((4, 8, 8), 0.95, 4), ((2, 4, 4), 0.9, 2), ((1, 7, 7), 0.75, 13)],
)
def test_tube_hides_int_ratio_hw_in_every_frame(grid, ratio, per_frame):
    """VideoMAE's TubeMaskingGenerator: int(ratio * h * w) hidden per frame, on any grid.

    (8, 14, 14) at 0.9 used to raise (156 visible over 8 frames); (4, 8, 8) at 0.95 kept int(256 * 0.05) = 12
    instead of VideoMAE's 4 * (64 - 60) = 16.
    """
    t, h, w = grid
    masker = _make("tube", ratio)
    out = masker(3, _ctx(grid, 3, dim=4))
    per_t = out.mask.view(3, t, h * w)
    assert ((~per_t).sum(-1) == per_frame).all()  # the visible count is per frame
    assert (per_t == per_t[:, :1]).all()
    assert masker.visible_count(grid) == t * per_frame == out.ids_keep.shape[1]


@pytest.mark.parametrize("grid", [(3, 5, 5), (8, 14, 14), (4, 8, 8), (5, 3, 7)])
def test_block_accepts_any_video_grid(grid):
    t, h, w = grid
    masker = _make("block", 0.9)
    out = masker(2, _ctx(grid, 2, dim=4))
    per_t = out.mask.view(2, t, h * w)
    assert (per_t == per_t[:, :1]).all()
    assert ((~per_t).sum(-1) == int(h * w * (1 - 0.9))).all()
    assert out.ids_keep.shape[1] == masker.visible_count(grid)


def test_per_frame_ratio_must_leave_a_visible_and_a_hidden_token():
    with pytest.raises(ValueError, match="per frame"):
        _make("tube", 0.05)(1, _ctx((2, 4, 4), 1))  # int(0.05 * 16) = 0 hidden per frame
    with pytest.raises(ValueError, match="per frame"):
        _make("block", 0.95)(1, _ctx((2, 4, 4), 1))  # int(16 * 0.05) = 0 visible per frame


def test_block_masks_are_contiguous():
    grid = (1, 14, 14)
    block = _make("block", 0.5)(8, _ctx(grid, 8, seed=1)).mask.view(8, 14, 14).numpy()
    rand = _make("random", 0.5)(8, _ctx(grid, 8, seed=1)).mask.view(8, 14, 14).numpy()

    def mean_component(ms):
        sizes = []
        for m in ms:
            lab, n = ndimage.label(m)
            sizes += list(np.bincount(lab.ravel())[1:])
        return float(np.mean(sizes))

    assert mean_component(block) > 3 * mean_component(rand)
    # few rectangles: far fewer connected pieces than hidden tokens
    pieces = [ndimage.label(m)[1] for m in block]
    assert max(pieces) <= 98 // 6


def test_attention_hides_most_attended_and_hints():
    grid = (1, 6, 6)
    ctx = _ctx(grid, 4)
    out = _make("attention", 0.75)(4, ctx)
    hidden = 36 - 9
    top = torch.argsort(ctx.scores, 1, descending=True)[:, :hidden]
    assert torch.equal(out.mask.gather(1, top), torch.ones_like(top, dtype=torch.bool))
    hinted = MASKERS.create("attention", mask_ratio=0.75, hint_ratio=0.2)(4, ctx)
    revealed = (~hinted.mask).gather(1, top).sum(1)
    assert (revealed == int(0.2 * hidden)).all()  # hints among the top tokens, count still exact
    none = MASKERS.create("attention", mask_ratio=0.75, apply_prob=0.0)(4, ctx)
    assert not torch.equal(none.mask, out.mask)
    with pytest.raises(ValueError, match="scores"):
        _make("attention", 0.75)(4, MaskContext(grid=grid))


def test_adaptive_sampling_is_differentiable():
    grid = (2, 4, 4)
    masker = _make("adaptive", 0.75)
    ctx = _ctx(grid, 3)
    out = masker(3, ctx)
    assert out.log_probs is not None and out.log_probs.requires_grad
    assert torch.allclose(out.log_probs.exp().sum(1), torch.ones(3), atol=1e-5)
    token_loss = torch.rand(3, 32)
    loss = adaptive_sampling_loss(out.log_probs, out.mask, token_loss)
    loss.backward()
    grads = [p.grad for p in masker.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # the loss is -mean over hidden tokens of log p * err
    m = out.mask.float()
    want = -(out.log_probs.detach() * token_loss * m).sum() / m.sum()
    assert torch.allclose(loss.detach(), want)


def test_adaptive_sampling_follows_probabilities():
    masker = _make("adaptive", 0.5)
    with torch.no_grad():
        masker.head.weight.zero_()
        masker.head.bias.zero_()
        masker.head.weight[0, 0] = 50.0  # logit = 50 * normalised token feature 0
    tokens = torch.zeros(64, 8, 16)
    tokens[:, :4, 0] = 5.0  # tokens 0..3 stand out -> almost surely sampled visible
    tokens[:, 4:, 0] = -5.0
    out = masker(64, MaskContext(grid=(1, 2, 4), tokens=tokens))
    assert (~out.mask[:, :4]).all()


def test_hard_patch_ramp():
    grid = (1, 8, 8)
    masker = MASKERS.create("hard_patch", mask_ratio=0.75, max_hard=0.5, ramp=0.5)
    assert masker.hard_share(0.0) == 0.0
    assert masker.hard_share(0.25) == pytest.approx(0.25)
    assert masker.hard_share(0.5) == pytest.approx(0.5) and masker.hard_share(1.0) == pytest.approx(0.5)
    hidden = 64 - 16
    # progress 0: no scores needed, purely random
    masker(2, MaskContext(grid=grid, progress=0.0))
    for progress, share in [(0.25, 0.25), (1.0, 0.5)]:
        ctx = _ctx(grid, 6, progress=progress)
        out = masker(6, ctx)
        n_hard = int(hidden * share)
        top = torch.argsort(ctx.scores, 1, descending=True)[:, :n_hard]
        assert out.mask.gather(1, top).all()  # every predicted-hardest token is hidden
    with pytest.raises(ValueError, match="scores"):
        masker(2, MaskContext(grid=grid, progress=1.0))


def test_ranking_loss_orders():
    target = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    mask = torch.tensor([[True, True, True, False]])
    good = ranking_loss(torch.tensor([[1.0, 5.0, 9.0, 0.0]]), target, mask)
    bad = ranking_loss(torch.tensor([[9.0, 5.0, 1.0, 0.0]]), target, mask)
    assert good < 0.1 < bad
    # the unmasked token does not count
    assert torch.allclose(good, ranking_loss(torch.tensor([[1.0, 5.0, 9.0, 100.0]]), target, mask))


def test_mask_to_output_rejects_ragged():
    with pytest.raises(ValueError, match="same number"):
        mask_to_output(torch.tensor([[True, False], [True, True]]))


# ---------------------------------------------------------------------------------------------------------
# block masking: BEiT's generator vs the exact style
# ---------------------------------------------------------------------------------------------------------
def _beit_generator(h, w, target, rng, min_patches=16, min_aspect=0.3):
    """BEiT's MaskingGenerator, written here from its description: a numpy mask and the block shapes placed."""
    mask = np.zeros((h, w), dtype=np.int64)
    lo, hi = math.log(min_aspect), math.log(1 / min_aspect)
    shapes, done = [], 0
    while done < target:
        budget = target - done
        placed = 0
        attempt = 0
        while attempt < 10 and placed == 0:
            attempt += 1
            area = rng.uniform(min_patches, budget)
            ratio = math.exp(rng.uniform(lo, hi))
            bh = int(round(math.sqrt(area * ratio)))
            bw = int(round(math.sqrt(area / ratio)))
            if bh >= h or bw >= w:
                continue
            y, x = rng.randint(0, h - bh), rng.randint(0, w - bw)
            fresh = bh * bw - int(mask[y : y + bh, x : x + bw].sum())
            if 0 < fresh <= budget:
                mask[y : y + bh, x : x + bw] = 1
                placed = fresh
                shapes.append((bh, bw))
        if placed == 0:
            break
        done += placed
    return mask.astype(bool), shapes


def test_beit_block_mask_is_beits_generator():
    for seed in range(40):
        want, want_shapes = _beit_generator(14, 14, 75, random.Random(seed))
        got, shapes = beit_block_mask(14, 14, 75, random.Random(seed), min_block=16, min_aspect=0.3)
        assert np.array_equal(got.numpy(), want) and shapes == want_shapes


def test_block_styles_statistics():
    """The exact style makes ~10x more 1x1 blocks than BEiT; BEiT's draws may end short; style='beit' never does."""
    h, hidden, draws = 14, 75, 300
    exact = MASKERS.create("block", min_block=16)
    rng = random.Random(0)
    ex_shapes = [exact._exact(h, h, hidden, rng)[1] for _ in range(draws)]
    beit = [beit_block_mask(h, h, hidden, rng, min_block=16) for _ in range(draws)]
    singles_exact = sum(s.count((1, 1)) for s in ex_shapes) / draws
    singles_beit = sum(s.count((1, 1)) for _, s in beit) / draws
    assert singles_exact > 4 * max(singles_beit, 0.01) and singles_exact > 0.2
    # about as many blocks in all: the difference is how the last few tokens are hidden
    blocks_exact = np.mean([len(s) for s in ex_shapes])
    blocks_beit = np.mean([len(s) for _, s in beit])
    assert abs(blocks_exact - blocks_beit) < 1.5
    counts = np.array([int(m.sum()) for m, _ in beit])
    assert counts.max() == hidden and 0.15 < (counts < hidden).mean() < 0.5  # BEiT stops short in ~30% of draws
    # the masker's beit style: BEiT's blocks, redrawn until the count is reached, so every row hides the same
    ratio = 1 - (h * h - hidden) / (h * h)
    out = MASKERS.create("block", mask_ratio=ratio, min_block=16, style="beit")(64, _ctx((1, h, h), 64, dim=4))
    assert (out.mask.sum(1) == hidden).all()
    pieces_beit = np.mean([ndimage.label(m.view(h, h).numpy())[1] for m in out.mask])
    pieces_raw = np.mean([ndimage.label(m.numpy())[1] for m, _ in beit])
    assert abs(pieces_beit - pieces_raw) < 0.5
    with pytest.raises(ValueError, match="style"):
        MASKERS.create("block", style="ibot")

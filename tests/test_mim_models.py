"""MAE / VideoMAE / ViT encoder: loss semantics, visible-only encoding, save/load, vision-tower contract."""

from __future__ import annotations

import math

import pytest
import torch

from mmtok import hub, registries
from mmtok.layers import PatchEmbed, grid_pos_embed, patchify, sincos_2d, unpatchify
from mmtok.mim import MAE, ViTEncoder, cls_attention
from mmtok.mim.masking import MaskContext, MaskOutput, mask_to_output

MODELS = registries.get("mim model")
MASKERS = registries.get("masker")
IMG = {"img_size": 32, "patch_size": 8, "in_chans": 3}
VID = {"img_size": 32, "patch_size": 8, "in_chans": 3, "num_frames": 4, "tubelet_size": 2}


def _mae(**kw) -> MAE:
    return MODELS.create("mae_micro", **{**IMG, **kw})


def _masks(model, b, ratio=0.75, name="random") -> MaskOutput:
    return MASKERS.create(name, mask_ratio=ratio)(b, MaskContext(grid=model.grid_size))


def test_layers_roundtrip_and_pos_embed():
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(x, 8), 8, (1, 4, 4), 3), x)
    v = torch.rand(2, 3, 4, 32, 32)
    assert torch.equal(unpatchify(patchify(v, 8, 2), 8, (2, 4, 4), 3, 2), v)
    # patch (0, 0) of patchify is the top-left 8x8 block in (p, q, c) order
    assert torch.equal(patchify(x, 8)[:, 0].view(2, 8, 8, 3), x[:, :, :8, :8].permute(0, 2, 3, 1))
    pe = sincos_2d(16, 3, 3, cls_token=True)
    assert pe.shape == (10, 16) and torch.equal(pe[0], torch.zeros(16))
    assert len({tuple(r.tolist()) for r in pe[1:]}) == 9  # every position distinct
    assert grid_pos_embed(30, (2, 3, 3)).shape == (18, 30)
    with pytest.raises(ValueError, match="expected images"):
        PatchEmbed(32, 8, 3, 16)(torch.rand(1, 1, 32, 32))


def test_encoder_sees_only_visible_tokens():
    model = _mae()
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    out = model(torch.rand(3, 3, 32, 32), _masks(model, 3, 0.75))
    k = int(16 * 0.25)
    assert seen == [torch.Size([3, 1 + k, 32])]
    assert out.latent.shape == (3, 1 + k, 32)
    assert out.pred.shape == (3, 16, 8 * 8 * 3)


def test_loss_only_on_hidden_tokens_and_zero_at_target():
    torch.manual_seed(0)
    model = _mae()
    x = torch.rand(2, 3, 32, 32)
    masks = _masks(model, 2)
    out = model(x, masks)
    want = ((out.pred - out.target) ** 2).mean(-1)[masks.mask].mean()
    assert torch.allclose(out.loss, want, atol=1e-6)
    # changing the predictor so visible tokens are off does not change the loss
    with torch.no_grad():
        target, _, _ = model.targets(x)
    model.decoder_pred.register_forward_hook(lambda m, i, o: torch.where(masks.mask[..., None], target, o + 100.0))
    zero = model(x, masks)
    assert zero.loss.item() == pytest.approx(0.0, abs=1e-10)
    assert (zero.token_loss[~masks.mask] > 100).all()


def test_targets_are_normalised_per_patch_and_per_channel_for_video():
    img = _mae()
    t, _, _ = img.targets(torch.rand(2, 3, 32, 32))
    assert torch.allclose(t.mean(-1), torch.zeros(2, 16), atol=1e-5)
    vid = MODELS.create("videomae_micro", **VID)
    t, _, _ = vid.targets(torch.rand(2, 3, 4, 32, 32))
    per_c = t.view(2, 32, -1, 3)
    assert torch.allclose(per_c.mean(2), torch.zeros(2, 32, 3), atol=1e-5)
    raw = _mae(norm_pix_loss=False)
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(raw.targets(x)[0], patchify(x * 2 - 1, 8))


def test_reconstruct_keeps_visible_pixels():
    model = _mae()
    x = torch.rand(2, 3, 32, 32)
    masks = _masks(model, 2)
    rec = model.reconstruct(x, masks)
    vis = ~masks.mask
    assert torch.allclose(patchify(rec, 8)[vis], patchify(x, 8)[vis], atol=1e-5)


def test_video_tube_forward_and_backward():
    model = MODELS.create("videomae_micro", **VID)
    assert model.grid_size == (2, 4, 4) and model.is_video
    x = torch.rand(2, 3, 4, 32, 32)
    out = model(x, _masks(model, 2, 0.75, "tube"))
    out.loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad is not None
    with pytest.raises(ValueError, match="mask has shape"):
        model(x, mask_to_output(torch.zeros(2, 16, dtype=torch.bool).index_fill(1, torch.tensor([0]), True)))


@pytest.mark.parametrize("name", ["mae_micro", "videomae_micro", "vit_micro"])
def test_save_load_equality(tmp_path, name):
    kw = VID if name.startswith("video") else IMG
    model = MODELS.create(name, **kw).eval()
    path = model.save_pretrained(tmp_path / name)
    back = hub.from_pretrained(path, kind="mim model").eval()
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.rand(2, 3, 4, 32, 32) if name.startswith("video") else torch.rand(2, 3, 32, 32)
    if isinstance(model, MAE):
        masks = _masks(model, 2, 0.75, "tube" if model.is_video else "random")
        assert torch.equal(model(x, masks).pred, back(x, masks).pred)
    else:
        assert torch.equal(model(x), back(x))


def test_export_encoder_is_a_vision_tower(tmp_path):
    mae = _mae()
    path = mae.export_encoder(tmp_path / "enc")
    enc = ViTEncoder.from_pretrained(path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(enc(x), mae.encoder(x))
    # the contract the MLLM relies on
    for attr in ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "embed_dim", "patch_size", "img_size"):
        assert hasattr(enc, attr), attr
    assert enc.pos_embed.shape == (1, 17, 32) and enc.cls_token.shape == (1, 1, 32)
    blk = enc.blocks[0]
    assert blk.attn.fused_attn and blk.attn.num_heads == 2 and blk.attn.qkv.in_features == 32
    states = enc.forward_features(x, output_hidden_states=True)
    assert len(states) == len(enc.blocks) + 1 and all(s.shape == (2, 17, 32) for s in states)
    assert torch.allclose(enc.norm(states[-1]), enc(x))
    assert enc.pooled_features(x, pool="mean", layers=2).shape == (2, 64)


def test_cls_attention_matches_eager_attention():
    enc = MODELS.create("vit_micro", **IMG).eval()
    x = torch.rand(2, 3, 32, 32)
    fast = cls_attention(enc, x)
    blk = enc.blocks[-1]
    rows = []
    blk.attn.fused_attn = False
    blk.attn.attn_drop.register_forward_hook(lambda m, i, o: rows.append(o[:, :, 0, 1:].mean(1)))
    enc.forward_features(x)
    assert torch.allclose(fast, rows[0], atol=1e-5)


def test_bad_configs_fail_clearly():
    with pytest.raises(ValueError, match="divisible"):
        MODELS.create("mae_micro", img_size=30, patch_size=8)
    with pytest.raises(Exception, match="Did you mean"):
        MODELS.create("mae_micro", patch_sise=8)


def test_video_targets_known_answer_on_a_low_contrast_tubelet():
    """VideoMAE's target: per tubelet and channel, (v - mean) / (std + 1e-6) on [0, 1] pixels, unbiased std.

    Each tubelet-channel group holds n = 2 * 8 * 8 = 128 values, half 0.5 + d and half 0.5 - d (d exact in
    float32), so mean = 0.5 and std = d * sqrt(n / (n - 1)): the target is +-d / (std + 1e-6). With d = 2**-10
    (std ~ 1e-3) the image formula d / sqrt(std**2 + 1e-6) would give ~0.70 instead of ~0.99.
    """
    vid = MODELS.create("videomae_micro", **VID)  # pixel_mean = pixel_std = 0.5: the scale must not leak in
    n = 2 * 8 * 8
    d = torch.tensor([2.0**-10, 2.0**-6, 0.0])  # per channel: low contrast, higher contrast, flat
    sign = torch.ones(1, 1, 4, 32, 32)
    sign[..., ::2, :] = -1.0  # alternate rows: every 8x8 patch of every frame is half +d, half -d
    x = 0.5 + sign * d.view(1, 3, 1, 1, 1)  # [1, 3, 4, 32, 32]
    t, mean, std = vid.targets(x)
    groups = t.view(1, 32, n, 3)  # (u, p, q, c) order: channel last
    for ch, dc in enumerate(d.tolist()):
        std_c = dc * math.sqrt(n / (n - 1))
        want = dc / (std_c + 1e-6) if dc else 0.0
        got = groups[..., ch].abs()
        assert torch.allclose(got, torch.full_like(got, want), rtol=1e-5, atol=1e-6), (ch, got.max().item(), want)
    # the low-contrast value by hand: 2**-10 / (2**-10 * sqrt(128 / 127) + 1e-6) = 0.995071...
    assert groups[..., 0].abs().max().item() == pytest.approx(0.995071, abs=2e-6)
    # sqrt(var + 1e-6), MAE's image formula, would differ by ~30% here
    assert abs(groups[..., 0].abs().max().item() - 2.0**-10 / math.sqrt((2.0**-10) ** 2 * n / (n - 1) + 1e-6)) > 0.2
    # target * std + mean gives back the [0, 1] pixels, and reconstruct keeps visible ones exactly
    torch.testing.assert_close(t * std + mean, patchify(x, 8, 2), atol=1e-6, rtol=0)
    masks = _masks(vid, 1, 0.5, "tube")
    rec = vid.reconstruct(x, masks)
    vis = ~masks.mask
    torch.testing.assert_close(patchify(rec, 8, 2)[vis], patchify(x, 8, 2)[vis], atol=1e-6, rtol=0)


def test_image_targets_keep_the_mae_formula():
    """Images stay on MAE's (v - mean) / sqrt(var + 1e-6) over the whole patch of model-scale pixels."""
    img = _mae()
    d = 2.0**-10
    x = torch.full((1, 3, 32, 32), 0.5)
    x[:, :, ::2] += d
    x[:, :, 1::2] -= d  # model scale (x - 0.5) / 0.5 = +-2d; a patch holds n = 8 * 8 * 3 values
    n = 8 * 8 * 3
    want = 2 * d / math.sqrt((2 * d) ** 2 * n / (n - 1) + 1e-6)
    t, _, _ = img.targets(x)
    torch.testing.assert_close(t.abs(), torch.full_like(t, want), rtol=1e-5, atol=1e-6)


def test_videomae_style_encoder_switches(tmp_path):
    """cls_token=False, the flat 1-D table, no final norm, norm_eps: shapes, the table, save/load, clear refusals."""
    from mmtok.mim.vit import flat_sinusoid_table

    kw = {**VID, "cls_token": False, "pos_embed_type": "flat", "final_norm": False, "norm_eps": 1e-12}
    model = MODELS.create("videomae_micro", **kw).eval()
    enc = model.encoder
    assert enc.cls_token is None and enc.num_prefix_tokens == 0 and isinstance(enc.norm, torch.nn.Identity)
    assert enc.pos_embed.shape == (1, 32, 32) and model.decoder_pos_embed.shape == (1, 32, 32)
    assert enc.blocks[0].norm1.eps == 1e-12 and model.decoder_norm.eps == 1e-12
    # the table by its definition: channel 2i is sin(n / 10000**(2i / D)), channel 2i + 1 its cosine
    table = flat_sinusoid_table(5, 6)
    angle = 3 / 10000 ** (2 / 6)
    assert table[3, 2].item() == pytest.approx(math.sin(angle), abs=1e-7)
    assert table[3, 3].item() == pytest.approx(math.cos(angle), abs=1e-7)
    assert torch.equal(enc.pos_embed[0], flat_sinusoid_table(32, 32))
    x = torch.rand(2, 3, 4, 32, 32)
    masks = _masks(model, 2, 0.75, "tube")
    out = model(x, masks)
    assert out.latent.shape == (2, 8, 32) and out.pred.shape == (2, 32, 2 * 8 * 8 * 3)
    assert enc.forward_features(x)[0].shape == (2, 32, 32)
    assert enc.pooled_features(x).shape == (2, 32)
    with pytest.raises(ValueError, match="no"):
        enc.pooled_features(x, pool="cls")
    with pytest.raises(ValueError, match="CLS"):
        cls_attention(enc, x)
    assert "encoder.cls_token" not in model.state_dict() and "encoder.norm.weight" not in model.state_dict()
    back = hub.from_pretrained(model.save_pretrained(tmp_path / "v"), kind="mim model").eval()
    assert back.encoder.blocks[0].norm1.eps == 1e-12
    assert torch.equal(model(x, masks).pred, back(x, masks).pred)
    with pytest.raises(ValueError, match="pos_embed_type"):
        MODELS.create("vit_micro", **IMG, pos_embed_type="learned")


def test_norm_pix_eps_damps_flat_noisy_tubelets_only():
    """``norm_pix_eps`` replaces 1e-6 in both formulas: with 0.05 a tubelet-channel of noise std ~0.012 (a dark
    noisy background) becomes a target of std ~0.2 instead of 1, while a high-contrast one barely changes."""
    n = 2 * 8 * 8
    sign = torch.ones(1, 1, 4, 32, 32)
    sign[..., ::2, :] = -1.0
    d = torch.tensor([0.012, 0.4, 0.0])  # per channel: background-like noise, an item edge, flat
    x = 0.5 + sign * d.view(1, 3, 1, 1, 1)
    ref = MODELS.create("videomae_micro", **VID)
    damped = MODELS.create("videomae_micro", **VID, norm_pix_eps=0.05)
    for ch, dc in enumerate(d.tolist()):
        std_c = dc * math.sqrt(n / (n - 1))
        for model, eps in ((ref, 1e-6), (damped, 0.05)):
            got = model.targets(x)[0].view(1, 32, n, 3)[..., ch].abs()
            want = dc / (std_c + eps)
            torch.testing.assert_close(got, torch.full_like(got, want), rtol=1e-5, atol=1e-6)
    t, mean, std = damped.targets(x)
    assert t.view(1, 32, n, 3)[..., 0].abs().max() < 0.2  # the noise is no longer a unit-variance target
    torch.testing.assert_close(t * std + mean, patchify(x, 8, 2), atol=1e-6, rtol=0)  # still invertible
    # images: sqrt(var + eps)
    img = _mae(norm_pix_eps=0.25)
    xi = torch.full((1, 3, 32, 32), 0.5)
    xi[:, :, ::2] += 0.1
    xi[:, :, 1::2] -= 0.1
    m = 8 * 8 * 3
    want = 0.2 / math.sqrt(0.2**2 * m / (m - 1) + 0.25)
    torch.testing.assert_close(img.targets(xi)[0].abs(), torch.full((1, 16, m), want), rtol=1e-5, atol=1e-6)

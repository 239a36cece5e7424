"""Checkpoints from elsewhere: transformers ViTMAE (parity on the same inputs and mask), official MAE files
(``mmtok convert mae``, checked against timm's ViT on the same keys), timm / open_clip safetensors as towers."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from mmtok import hub, registries
from mmtok.mim.convert import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConversionError,
    convert_mae_checkpoint,
    load_hf_vitmae,
    mask_from_noise,
    vitmae_to_mmtok,
)

HF_TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "image_size": 16,
    "patch_size": 4,
    "decoder_hidden_size": 16,
    "decoder_num_hidden_layers": 1,
    "decoder_num_attention_heads": 2,
    "decoder_intermediate_size": 64,
    "mask_ratio": 0.75,
}


def _hf_vitmae(**over):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(0)
    model = ViTMAEForPreTraining(ViTMAEConfig(**{**HF_TINY, **over})).eval()
    with torch.no_grad():  # transformers' init is tiny (std 0.02): widen it so differences would show
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "position" not in name and "pos_embed" not in name:
                p.normal_(0, 1 / math.sqrt(p.shape[-1] * (p.shape[-2] if p.ndim == 4 else 1)))
            elif p.ndim == 1:
                p.normal_(0, 0.1)
        # real checkpoints store MAE's fixed sine-cosine tables (a random init in transformers 5 leaves zeros)
        model.vit.embeddings.position_embeddings.copy_(torch.from_numpy(_official_sincos(32, 4))[None])
        model.decoder.decoder_pos_embed.copy_(torch.from_numpy(_official_sincos(16, 4))[None])
    return model


def _normalise(x, mean, std):
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_vitmae_parity_same_inputs_same_mask(norm_pix_loss):
    hf = _hf_vitmae(norm_pix_loss=norm_pix_loss)
    mae = vitmae_to_mmtok(hf.config.to_dict(), hf.state_dict(), IMAGENET_MEAN, IMAGENET_STD)
    x = torch.rand(3, 3, 16, 16)
    noise = torch.rand(3, 16)
    with torch.no_grad():
        ref = hf(pixel_values=_normalise(x, IMAGENET_MEAN, IMAGENET_STD), noise=noise)
        enc = hf.vit(pixel_values=_normalise(x, IMAGENET_MEAN, IMAGENET_STD), noise=noise).last_hidden_state
        out = mae(x, mask_from_noise(noise, hf.config.mask_ratio))
    assert torch.equal(out.mask, ref.mask.bool())
    torch.testing.assert_close(out.latent, enc, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.pred, ref.logits, atol=2e-5, rtol=1e-4)
    assert out.pred.abs().mean() > 0.1  # a non-trivial output, not two zeros


def test_vitmae_parity_of_the_loss_with_scalar_normalisation():
    """mean/std equal over channels map to mmtok's own scalar normalisation: targets and loss equal too."""
    hf = _hf_vitmae(norm_pix_loss=True)
    mae = vitmae_to_mmtok(hf.config.to_dict(), hf.state_dict(), [0.5] * 3, [0.5] * 3)
    assert mae.config.pixel_mean == 0.5 and mae.config.pixel_std == 0.5
    x, noise = torch.rand(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        ref = hf(pixel_values=(x - 0.5) / 0.5, noise=noise)
        out = mae(x, mask_from_noise(noise, 0.75))
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.pred, ref.logits, atol=2e-5, rtol=1e-4)


def _old_names(state):
    """transformers 4.x key names (what most downloaded ViTMAE folders hold)."""
    out = {}
    for k, v in state.items():
        k = k.replace("vit.layers.", "vit.encoder.layer.")
        for new, old in (
            ("attention.q_proj", "attention.attention.query"),
            ("attention.k_proj", "attention.attention.key"),
            ("attention.v_proj", "attention.attention.value"),
            ("attention.o_proj", "attention.output.dense"),
            ("mlp.fc1", "intermediate.dense"),
            ("mlp.fc2", "output.dense"),
        ):
            k = k.replace(new, old)
        out[k] = v
    return out


def test_vitmae_folder_old_key_names_cli_and_tower(tmp_path):
    from safetensors.torch import save_file

    from mmtok.cli.main import main

    hf = _hf_vitmae()
    src = tmp_path / "hf"
    src.mkdir()
    cfg = hf.config.to_dict()
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    save_file({k: v.contiguous() for k, v in _old_names(hf.state_dict()).items()}, str(src / "model.safetensors"))
    mae = load_hf_vitmae(src)
    x, noise = torch.rand(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        ref = hf(pixel_values=(x - 0.5) / 0.25, noise=noise)
        torch.testing.assert_close(mae(x, mask_from_noise(noise, 0.75)).pred, ref.logits, atol=2e-5, rtol=1e-4)
    # the CLI writes an mmtok folder; it reloads with hub and serves as an mmtok_vit tower
    assert main(["convert", "vitmae", "--input", str(src), "--out", str(tmp_path / "mm")]) == 0
    back = hub.from_pretrained(tmp_path / "mm", kind="mim model")
    tower = registries.get("vision tower").create("mmtok_vit", path=str(tmp_path / "mm"))
    with torch.no_grad():
        feats = tower.hidden_states(tower.preprocess(x))[-1]
        ref_states = hf.vit(pixel_values=(x - 0.5) / 0.25, output_hidden_states=True, noise=None)
    assert back.config.depth == 2 and len(tower.hidden_states(tower.preprocess(x))) == 3
    # mmtok's tower runs every patch; transformers masks even at inference, so compare against mmtok's MAE encoder
    with torch.no_grad():
        torch.testing.assert_close(feats, mae.encoder.forward_features(x)[-1], atol=1e-4, rtol=1e-4)
    assert ref_states.last_hidden_state.shape[1] == 1 + 4  # (75% of 16 hidden: the reference still masks)


def test_vitmae_refusals(tmp_path):
    from mmtok.cli.main import main

    video = tmp_path / "videomae"
    video.mkdir()
    (video / "config.json").write_text(json.dumps({"model_type": "videomae"}))
    with pytest.raises(ConversionError, match="convert videomae"):
        load_hf_vitmae(video)
    empty = tmp_path / "bin_only"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "vit_mae"}))
    (empty / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ConversionError, match="never unpickles"):
        load_hf_vitmae(empty)
    (empty / "config.json").write_text("[1, 2]")
    assert main(["convert", "vitmae", "--input", str(empty), "--out", str(tmp_path / "o")]) == 2


# ---------------------------------------------------------------------------------------------------------------
# official MAE files
# ---------------------------------------------------------------------------------------------------------------
def _official_sincos(dim: int, grid: int) -> np.ndarray:
    """MAE's util/pos_embed.py table written out from its definition: w index in the first half, h in the second."""

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    emb = np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def _official_state(width=32, depth=2, dec=16, dec_depth=1, patch=4, grid=4, decoder=True) -> dict[str, torch.Tensor]:
    """A state dict with models_mae.py's key names and shapes (random values, O(1) activations)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        fan = shape[-1] if len(shape) > 1 else 10
        if len(shape) == 4:
            fan = shape[1] * shape[2] * shape[3]
        return torch.randn(*shape, generator=g) / math.sqrt(fan)

    sd = {
        "cls_token": r(1, 1, width),
        "pos_embed": torch.from_numpy(_official_sincos(width, grid)).float()[None],
        "patch_embed.proj.weight": r(width, 3, patch, patch),
        "patch_embed.proj.bias": r(width),
        "norm.weight": 1 + r(width),
        "norm.bias": r(width),
    }

    def block(prefix, d):
        sd.update(
            {
                f"{prefix}.norm1.weight": 1 + r(d),
                f"{prefix}.norm1.bias": r(d),
                f"{prefix}.attn.qkv.weight": r(3 * d, d),
                f"{prefix}.attn.qkv.bias": r(3 * d),
                f"{prefix}.attn.proj.weight": r(d, d),
                f"{prefix}.attn.proj.bias": r(d),
                f"{prefix}.norm2.weight": 1 + r(d),
                f"{prefix}.norm2.bias": r(d),
                f"{prefix}.mlp.fc1.weight": r(4 * d, d),
                f"{prefix}.mlp.fc1.bias": r(4 * d),
                f"{prefix}.mlp.fc2.weight": r(d, 4 * d),
                f"{prefix}.mlp.fc2.bias": r(d),
            }
        )

    for i in range(depth):
        block(f"blocks.{i}", width)
    if decoder:
        sd.update(
            {
                "mask_token": r(1, 1, dec),
                "decoder_embed.weight": r(dec, width),
                "decoder_embed.bias": r(dec),
                "decoder_pos_embed": torch.from_numpy(_official_sincos(dec, grid)).float()[None],
                "decoder_norm.weight": 1 + r(dec),
                "decoder_norm.bias": r(dec),
                "decoder_pred.weight": r(patch * patch * 3, dec),
                "decoder_pred.bias": r(patch * patch * 3),
            }
        )
        for i in range(dec_depth):
            block(f"decoder_blocks.{i}", dec)
    return sd


def _timm_reference(sd, x):
    """timm's ViT shares the official key names: the encoder's output on ImageNet-normalised pixels."""
    import timm

    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=0,
        global_pool="",
    ).eval()
    enc = {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token"))}
    vit.load_state_dict(enc, strict=True)
    with torch.no_grad():
        return vit.forward_features(_normalise(x, IMAGENET_MEAN, IMAGENET_STD))


@pytest.mark.parametrize("decoder", [True, False])
def test_official_mae_checkpoint_converts_and_matches_timm(tmp_path, decoder):
    from mmtok.cli.main import main

    sd = _official_state(decoder=decoder)
    ckpt = tmp_path / "mae.pth"
    torch.save({"model": sd, "epoch": 799, "args": argparse.Namespace(model="mae_vit_tiny")}, ckpt)
    model, out = convert_mae_checkpoint(ckpt, tmp_path / "direct", num_heads=2, decoder_heads=2)
    x = torch.rand(2, 3, 16, 16)
    want = _timm_reference(sd, x)
    enc = model.encoder if decoder else model
    with torch.no_grad():
        torch.testing.assert_close(enc(x), want, atol=1e-5, rtol=1e-5)  # in memory: eps 1e-6 as models_mae.py
    assert (
        main(
            ["convert", "mae", "--input", str(ckpt), "--out", str(tmp_path / "cli"), "--num-heads", "2"]
            + (["--decoder-heads", "2"] if decoder else [])
        )
        == 0
    )
    back = hub.from_pretrained(tmp_path / "cli", kind="mim model")
    assert type(back).__name__ == ("MAE" if decoder else "ViTEncoder")
    back_enc = back.encoder if decoder else back
    with torch.no_grad():
        torch.testing.assert_close(back_enc(x), want, atol=1e-5, rtol=1e-5)  # reloaded: eps 1e-6 is in the config
    if decoder:
        # the decoder's mapping: MAE's forward written from models_mae.py with the official tensors
        noise = torch.rand(2, 16)
        masks = mask_from_noise(noise, 0.75)
        with torch.no_grad():
            pred = model(x, masks).pred
            ref = _official_decoder(sd, model.encoder.forward_masked(x, masks.ids_keep), masks.ids_restore)
        torch.testing.assert_close(pred, ref, atol=1e-5, rtol=1e-5)


def _official_decoder(sd, latent, ids_restore):
    """models_mae.py forward_decoder with plain torch ops on the official tensors (2 heads, eps 1e-6)."""
    import torch.nn.functional as F

    ln = lambda t, p: F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-6)  # noqa: E731
    lin = lambda t, p: F.linear(t, sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731
    x = lin(latent, "decoder_embed")
    b, n = ids_restore.shape
    mask_tokens = sd["mask_token"].expand(b, n + 1 - x.shape[1], -1)
    x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
    x = torch.cat([x[:, :1], x_], dim=1) + sd["decoder_pos_embed"]
    h, d = 2, x.shape[-1] // 2
    y = ln(x, "decoder_blocks.0.norm1")
    q, k, v = lin(y, "decoder_blocks.0.attn.qkv").view(b, -1, 3, h, d).permute(2, 0, 3, 1, 4)
    att = ((q @ k.transpose(-1, -2)) / math.sqrt(d)).softmax(-1) @ v
    x = x + lin(att.transpose(1, 2).reshape(b, -1, h * d), "decoder_blocks.0.attn.proj")
    y = ln(x, "decoder_blocks.0.norm2")
    x = x + lin(F.gelu(lin(y, "decoder_blocks.0.mlp.fc1")), "decoder_blocks.0.mlp.fc2")
    return lin(ln(x, "decoder_norm"), "decoder_pred")[:, 1:]


class Evil:
    """Any class a checkpoint names is refused by weights_only, so code it carries never runs."""

    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_official_mae_refusals(tmp_path):
    from mmtok.cli.main import main

    bad = tmp_path / "evil.pth"
    torch.save({"model": _official_state(decoder=False), "payload": Evil()}, bad)
    with pytest.raises(ConversionError, match="weights_only"):
        convert_mae_checkpoint(bad, tmp_path / "o")
    sd = _official_state(decoder=False)
    sd["pos_embed"] = torch.randn_like(sd["pos_embed"])  # learned positions: cannot be honoured
    torch.save({"model": sd}, tmp_path / "learned.pth")
    with pytest.raises(ConversionError, match="sine-cosine"):
        convert_mae_checkpoint(tmp_path / "learned.pth", tmp_path / "o", num_heads=2)
    torch.save({"model": {"foo": torch.zeros(1)}}, tmp_path / "other.pth")
    assert main(["convert", "mae", "--input", str(tmp_path / "other.pth"), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    assert main(["convert", "mae", "--input", str(tmp_path / "junk.pth"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------
# timm and open_clip weight files as MLLM towers
# ---------------------------------------------------------------------------------------------------------------
TIMM_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
LLM = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "max_position_embeddings": 256,
}


def test_timm_safetensors_file_and_hub_folder_as_tower(tmp_path):
    import timm
    from safetensors.torch import save_file
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **TIMM_ARGS).eval()
    # timm's own hub writer: config.json (architecture, model_args, pretrained_cfg) + model.safetensors
    save_for_hf(ref, str(tmp_path / "timm"), model_args=TIMM_ARGS, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref.forward_features(px)
    towers = registries.get("vision tower")
    by_file = towers.create("timm_vit", kwargs=TIMM_ARGS, checkpoint=str(tmp_path / "vit.safetensors")).eval()
    by_folder = towers.create("timm_vit", checkpoint=str(tmp_path / "timm")).eval()
    pre = json.loads((tmp_path / "timm" / "config.json").read_text())["pretrained_cfg"]
    assert by_folder.config.mean == pre["mean"] and by_folder.config.kwargs["embed_dim"] == 32
    for tower in (by_file, by_folder):
        with torch.no_grad():
            torch.testing.assert_close(tower.model.norm(tower.hidden_states(px)[-1]), want)
    # an MLLM over it saves and reloads without the folder (the tower weights travel with the MLLM)
    mllm = registries.get("mllm").create(
        "llava", tower={"name": "timm_vit", "checkpoint": str(tmp_path / "timm")}, llm=LLM, image_token_id=63
    )
    mllm.save_pretrained(tmp_path / "mllm")
    import shutil

    shutil.rmtree(tmp_path / "timm")
    from mmtok.mllm import MLLM

    back = MLLM.from_pretrained(tmp_path / "mllm").eval()
    with torch.no_grad():
        torch.testing.assert_close(back.tower.model.norm(back.tower.hidden_states(px)[-1]), want)
    # a file for another size is one TowerError, not a torch traceback
    from mmtok.mllm.towers import TowerError

    with pytest.raises(TowerError, match="does not fit"):
        towers.create("timm_vit", kwargs={**TIMM_ARGS, "embed_dim": 64}, checkpoint=str(tmp_path / "vit.safetensors"))


def test_open_clip_safetensors_file_and_hub_folder_as_tower(tmp_path):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vision = {"layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32}
    text = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
    clip = open_clip.CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(**vision), text_cfg=CLIPTextCfg(**text)).eval()
    clip.visual.image_mean, clip.visual.image_std = (0.4, 0.45, 0.5), (0.3, 0.25, 0.2)  # as create_model sets them
    folder = tmp_path / "oc"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    # open_clip's own config writer: model_cfg + preprocess_cfg
    save_config_for_hf(
        clip, folder / "open_clip_config.json", {"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}
    )
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = clip.encode_image(px)  # [B, 16]: pooled [CLS] after ln_post and the projection
    towers = registries.get("vision tower")
    by_folder = towers.create("open_clip", checkpoint=str(folder)).eval()
    by_file = towers.create(
        "open_clip", vision_cfg=vision, embed_dim=16, checkpoint=str(folder / "open_clip_model.safetensors")
    ).eval()
    assert by_folder.config.mean == [0.4, 0.45, 0.5] and by_folder.config.std == [0.3, 0.25, 0.2]
    for tower in (by_folder, by_file):
        assert tower.num_patches == 16 and tower.config.checkpoint == ""
        with torch.no_grad():
            hs = tower.hidden_states(px)
            torch.testing.assert_close(tower.model.ln_post(hs[-1][:, 0]) @ tower.model.proj, want)


def test_vitmae_encoder_alone_matches_transformers_on_every_patch():
    """ViTMAEModel (no decoder) -> mmtok ViT encoder; with mask_ratio 0 and sorted noise transformers keeps every
    patch in raster order, which is what the mmtok_vit tower feeds the LLM."""
    from transformers import ViTMAEModel

    hf = _hf_vitmae(mask_ratio=0.0)
    enc_hf = ViTMAEModel(hf.config).eval()
    enc_hf.load_state_dict({k[len("vit.") :]: v for k, v in hf.state_dict().items() if k.startswith("vit.")})
    state = {k: v for k, v in enc_hf.state_dict().items()}  # no "vit." prefix, as a saved ViTMAEModel has
    enc = vitmae_to_mmtok(enc_hf.config.to_dict(), state, IMAGENET_MEAN, IMAGENET_STD)
    assert type(enc).__name__ == "ViTEncoder"
    x = torch.rand(2, 3, 16, 16)
    noise = torch.arange(16.0).expand(2, -1)  # sorted: the identity shuffle
    with torch.no_grad():
        want = enc_hf(pixel_values=_normalise(x, IMAGENET_MEAN, IMAGENET_STD), noise=noise).last_hidden_state
        torch.testing.assert_close(enc(x), want, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# transformers VideoMAE
# ---------------------------------------------------------------------------------------------------------------
HF_VIDEO_TINY = {
    "image_size": 16,
    "patch_size": 4,
    "num_frames": 4,
    "tubelet_size": 2,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "decoder_hidden_size": 16,
    "decoder_num_hidden_layers": 1,
    "decoder_num_attention_heads": 2,
    "decoder_intermediate_size": 64,
}
N_VIDEO = 2 * 4 * 4  # (4 frames / tubelet 2) x (16 / 4)^2 tokens


def _hf_videomae(**over):
    from transformers import VideoMAEConfig, VideoMAEForPreTraining

    torch.manual_seed(0)
    model = VideoMAEForPreTraining(VideoMAEConfig(**{**HF_VIDEO_TINY, **over})).eval()
    with torch.no_grad():  # transformers' init is tiny (std 0.02) and zero biases: widen it so differences show
        for p in model.parameters():
            if p.ndim >= 2:
                fan = p[0].numel() if p.ndim > 2 else p.shape[-1]
                p.normal_(0, 1 / math.sqrt(fan))
            else:
                p.normal_(0, 0.1)
    return model


def _video_inputs(b=3, hidden=24, seed=0):
    """Clips [B, C, T, H, W] in [0, 1], transformers' pixel_values [B, T, C, H, W] and a bool mask [B, N].

    Clip 0 is low-contrast (std ~ 6e-4 per tubelet), where VideoMAE's (v - mean) / (std + 1e-6) and MAE's
    (v - mean) / sqrt(var + 1e-6) differ by about 2x, so the loss comparison checks the target formula too.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, 4, 16, 16, generator=g)
    x[0] = 0.5 + (x[0] - 0.5) * 2e-3
    pixel_values = _normalise(x.transpose(1, 2).reshape(-1, 3, 16, 16), IMAGENET_MEAN, IMAGENET_STD)
    pixel_values = pixel_values.view(b, 4, 3, 16, 16)
    order = torch.rand(b, N_VIDEO, generator=g).argsort(1)
    mask = torch.zeros(b, N_VIDEO, dtype=torch.bool).scatter(1, order[:, :hidden], True)
    return x, pixel_values, mask


@pytest.mark.parametrize(
    "over",
    [
        {"norm_pix_loss": True, "use_mean_pooling": True, "qv_bias": True},
        {"norm_pix_loss": False, "use_mean_pooling": False, "qv_bias": False, "layer_norm_eps": 1e-6},
    ],
    ids=["defaults", "raw-targets_final-norm_no-bias"],
)
def test_videomae_parity_same_inputs_same_mask(over):
    from mmtok.mim.convert import videomae_to_mmtok
    from mmtok.mim.masking import mask_to_output

    hf = _hf_videomae(**over)
    mae = videomae_to_mmtok(hf.config.to_dict(), hf.state_dict(), IMAGENET_MEAN, IMAGENET_STD)
    c = mae.config
    assert (c.cls_token, c.pos_embed_type, c.final_norm) == (False, "flat", not over["use_mean_pooling"])
    assert c.qkv_bias == over["qv_bias"] and c.norm_eps == over.get("layer_norm_eps", 1e-12)
    # the fixed position tables are VideoMAE's own, encoder and decoder
    torch.testing.assert_close(mae.encoder.pos_embed, hf.videomae.embeddings.position_embeddings, atol=1e-6, rtol=0)
    torch.testing.assert_close(mae.decoder_pos_embed, hf.position_embeddings, atol=1e-6, rtol=0)
    x, pixel_values, mask = _video_inputs()
    with torch.no_grad():
        ref = hf(pixel_values=pixel_values, bool_masked_pos=mask)
        enc = hf.videomae(pixel_values=pixel_values, bool_masked_pos=mask).last_hidden_state
        out = mae(x, mask_to_output(mask))
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.latent, enc, atol=2e-5, rtol=1e-4)  # visible tokens in raster order
    pred_hidden = out.pred[mask].view(3, -1, out.pred.shape[-1])  # transformers predicts hidden tokens only
    torch.testing.assert_close(pred_hidden, ref.logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-4)
    assert out.pred.abs().mean() > 0.1 and out.latent.abs().mean() > 0.1  # non-trivial outputs
    assert out.loss > 0.1  # an untrained model: a loss near zero would say both sides compared nothing


def test_videomae_folder_cli_reload_and_tower(tmp_path):
    from mmtok.cli.main import main
    from mmtok.mim.convert import load_hf_videomae
    from mmtok.mim.masking import mask_to_output

    hf = _hf_videomae()
    src = tmp_path / "hf"
    hf.save_pretrained(src)  # what users download: safetensors with q_bias / v_bias
    from safetensors.torch import load_file

    assert any(k.endswith("attention.attention.q_bias") for k in load_file(str(src / "model.safetensors")))
    (src / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)})
    )
    mae = load_hf_videomae(src)
    x, pixel_values, mask = _video_inputs(b=2, hidden=28, seed=1)
    with torch.no_grad():
        ref = hf(pixel_values=pixel_values, bool_masked_pos=mask)
        out = mae(x, mask_to_output(mask))
    torch.testing.assert_close(out.pred[mask].view(2, -1, 96), ref.logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-4)
    # the CLI writes an mmtok folder that reloads with every switch and epsilon (equal outputs)
    assert main(["convert", "videomae", "--input", str(src), "--out", str(tmp_path / "mm")]) == 0
    back = hub.from_pretrained(tmp_path / "mm", kind="mim model").eval()
    assert back.encoder.blocks[0].norm1.eps == 1e-12 and back.decoder_norm.eps == 1e-5
    with torch.no_grad():
        again = back(x, mask_to_output(mask))
    torch.testing.assert_close(again.pred, out.pred, atol=0, rtol=0)
    torch.testing.assert_close(again.loss, out.loss, atol=0, rtol=0)
    # as an mmtok_vit tower: no prefix token; its hidden states are the encoder's on every tubelet
    tower = registries.get("vision tower").create("mmtok_vit", path=str(tmp_path / "mm"))
    assert tower.num_prefix_tokens == 0 and tower.hidden_size == 32 and tower.num_layers == 2
    with torch.no_grad():
        states = tower.hidden_states(x)
        torch.testing.assert_close(states[-1], back.encoder.forward_features(x)[-1])
    assert len(states) == 3 and states[-1].shape == (2, N_VIDEO, 32)


def test_videomae_encoder_alone_matches_transformers_on_every_tubelet():
    """VideoMAEModel (no decoder) -> mmtok ViT encoder; no mask: every tubelet, the features a tower would use."""
    from transformers import VideoMAEModel

    from mmtok.mim.convert import videomae_to_mmtok

    hf = _hf_videomae(use_mean_pooling=False)
    enc_hf = VideoMAEModel(hf.config).eval()
    enc_hf.load_state_dict({k[len("videomae.") :]: v for k, v in hf.state_dict().items() if k.startswith("videomae.")})
    enc = videomae_to_mmtok(enc_hf.config.to_dict(), enc_hf.state_dict(), IMAGENET_MEAN, IMAGENET_STD)
    assert type(enc).__name__ == "ViTEncoder" and enc.cls_token is None
    x, pixel_values, _ = _video_inputs(b=2)
    with torch.no_grad():
        want = enc_hf(pixel_values=pixel_values).last_hidden_state  # final LayerNorm: use_mean_pooling=False
        torch.testing.assert_close(enc(x), want, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(enc.pooled_features(x), want.mean(1), atol=2e-5, rtol=1e-4)


def test_videomae_refusals(tmp_path):
    from mmtok.cli.main import main
    from mmtok.mim.convert import load_hf_videomae, videomae_to_mmtok

    image = tmp_path / "vitmae"
    image.mkdir()
    (image / "config.json").write_text(json.dumps({"model_type": "vit_mae"}))
    with pytest.raises(ConversionError, match="convert vitmae"):
        load_hf_videomae(image)
    assert main(["convert", "videomae", "--input", str(image), "--out", str(tmp_path / "o")]) == 2
    hf = _hf_videomae()
    with pytest.raises(ConversionError, match="not square"):
        videomae_to_mmtok({**hf.config.to_dict(), "image_size": [16, 8]}, hf.state_dict())
    with pytest.raises(ConversionError, match="decoder MLP ratio"):
        videomae_to_mmtok({**hf.config.to_dict(), "decoder_intermediate_size": 32}, hf.state_dict())
    sd = {k: v for k, v in hf.state_dict().items() if "layer.1.layernorm_after" not in k}
    with pytest.raises(ConversionError, match="layernorm_after"):
        videomae_to_mmtok(hf.config.to_dict(), sd)
    assert not (tmp_path / "o").exists()

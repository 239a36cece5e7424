"""mmtok's own MAE ViT encoder as the MLLM's vision tower (``mmtok_vit``)."""

from __future__ import annotations

import pytest
import torch

from mmtok import registries
from mmtok.mim.vit import cls_attention
from mmtok.mllm.modeling import MLLM

LLM = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "pad_token_id": 0,
    "eos_token_id": 2,
    "max_position_embeddings": 256,
}


def _encoder(tmp_path):
    torch.manual_seed(0)
    enc = registries.get("mim model").create(
        "vit", img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2
    )
    enc.save_pretrained(tmp_path / "vit")
    return enc.eval()


def test_mmtok_vit_tower_feeds_the_encoder_exactly_what_pretraining_did(tmp_path):
    enc = _encoder(tmp_path)
    model = (
        registries.get("mllm")
        .create("llava", tower={"name": "mmtok_vit", "path": str(tmp_path / "vit")}, llm=LLM, image_token_id=63)
        .eval()
    )
    assert model.num_image_tokens == 16 and model.tower.num_prefix_tokens == 1
    grey = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        _, states = model.encode_images(grey)
        want = enc.forward_features(grey, output_hidden_states=True)
        for a, b in zip(states, want):
            torch.testing.assert_close(a, b)  # no second normalisation, no channel expansion
        # RGB input reaches a grayscale encoder as its luminance, at the encoder's resolution
        rgb = grey.expand(-1, 3, -1, -1)
        _, states_rgb = model.encode_images(torch.nn.functional.pad(rgb, (0, 0, 0, 0)))
        torch.testing.assert_close(states_rgb[-1], want[-1], atol=1e-5, rtol=1e-5)
        # the [CLS] pruner's score from q/k matches the encoder's own [CLS] attention of the feature layer
        ctx_model = (
            registries.get("mllm")
            .create(
                "llava",
                tower={"name": "mmtok_vit", "path": str(tmp_path / "vit")},
                llm=LLM,
                image_token_id=63,
                feature_layer=-1,
            )
            .eval()
        )
        q, k = ctx_model.tower.layer_qk(1, want[1])  # q comes pre-scaled by 1/sqrt(d)
        row = (q[:, :, :1] @ k.transpose(-1, -2)).softmax(-1).mean(1)[:, 0, 1:]
        torch.testing.assert_close(row, cls_attention(enc, grey))


def test_mllm_with_mmtok_vit_saves_and_reloads_without_the_encoder_folder(tmp_path):
    _encoder(tmp_path)
    model = (
        registries.get("mllm")
        .create("llava", tower={"name": "mmtok_vit", "path": str(tmp_path / "vit")}, llm=LLM, image_token_id=63)
        .eval()
    )
    model.save_pretrained(tmp_path / "mllm")
    (tmp_path / "vit" / "model.safetensors").unlink()  # the MLLM folder must be self-contained
    back = MLLM.from_pretrained(tmp_path / "mllm").eval()
    ids = torch.tensor([[5, 63, 7, 8]])
    img = torch.rand(1, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(back(ids, img).logits, model(ids, img).logits)


# ---------------------------------------------------------------------------------------------------------
# no pickles, square grids, LLaVA's "default" feature strategy
# ---------------------------------------------------------------------------------------------------------
TIMM_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _timm(**extra):
    return registries.get("vision tower").create("timm_vit", kwargs=TIMM_TINY, **extra).eval()


def test_checkpoints_must_be_safetensors_and_pickles_are_never_read(tmp_path):
    from safetensors.torch import save_file

    from mmtok.mllm.towers import TowerError, load_local_state_dict

    ref = _timm()
    state = {k: v.contiguous() for k, v in ref.model.state_dict().items()}
    save_file(state, str(tmp_path / "tower.safetensors"))
    back = _timm(checkpoint=str(tmp_path / "tower.safetensors"))
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back.hidden_states(px)[-1], ref.hidden_states(px)[-1])
    # a torch.save file is refused before it is opened, with the command that converts it
    torch.save(state, tmp_path / "tower.pt")
    with pytest.raises(TowerError) as e:
        _timm(checkpoint=str(tmp_path / "tower.pt"))
    msg = str(e.value)
    assert "tower.pt" in msg and "tower.safetensors" in msg and "save_file" in msg and "never unpickles" in msg
    # a pickle renamed to .safetensors is not read either
    (tmp_path / "renamed.safetensors").write_bytes((tmp_path / "tower.pt").read_bytes())
    with pytest.raises(TowerError, match="renamed.safetensors"):
        load_local_state_dict(tmp_path / "renamed.safetensors")
    with pytest.raises(TowerError, match="does not exist"):
        load_local_state_dict(tmp_path / "missing.safetensors")


def test_hf_tower_folder_with_only_pytorch_model_bin_is_refused(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mmtok.mllm.towers import TowerError

    cfg = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    folder = tmp_path / "clip"
    model = CLIPVisionModel(cfg)
    model.save_pretrained(folder)  # safetensors: loads
    tower = registries.get("vision tower").create("hf_clip", path=str(folder))
    assert tower.num_patches == 16
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # what old checkpoints ship
    with pytest.raises(TowerError, match="pytorch_model.bin.*never unpickles"):
        registries.get("vision tower").create("hf_clip", path=str(folder))


def test_non_square_timm_tower_is_refused_at_build_time():
    from mmtok.mllm.towers import TowerError

    with pytest.raises(TowerError, match=r"img_size \(32, 48\) is not square"):
        registries.get("vision tower").create("timm_vit", kwargs={**TIMM_TINY, "img_size": (32, 48)})
    with pytest.raises(TowerError, match="patch_size .* is not square"):
        registries.get("vision tower").create("timm_vit", kwargs={**TIMM_TINY, "patch_size": (8, 4)})
    assert (
        _timm().image_size == 32
        and registries.get("vision tower").create("timm_vit", kwargs={**TIMM_TINY, "img_size": (32, 32)}).num_patches
        == 16
    )


def _tiny_llava(vision: dict):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=vision,
        text_config={**LLM, "model_type": "llama"},
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_token_id=63,
    )
    return LlavaForConditionalGeneration(cfg).eval()


def test_llava_default_strategy_matches_transformers_on_siglip_and_clip(caplog):
    """transformers' LLaVA "default" drops index 0 even on SigLIP (no [CLS]): 24 of 25 features (CLIP: its [CLS])."""
    from mmtok.mllm.towers import HFVisionTower, HFVisionTowerConfig, num_feature_tokens, select_features

    small = {"image_size": 20, "patch_size": 4, "hidden_size": 32, "intermediate_size": 64}
    for kind, prefix in (("siglip_vision_model", 0), ("clip_vision_model", 1)):
        hf = _tiny_llava({"model_type": kind, **small, "num_hidden_layers": 2, "num_attention_heads": 2})
        tower = HFVisionTower(HFVisionTowerConfig(model_type=kind), model=hf.model.vision_tower).eval()
        assert tower.num_prefix_tokens == prefix and tower.num_patches == 25
        px = torch.randn(2, 3, 20, 20)
        with torch.no_grad(), caplog.at_level("WARNING", logger="mmtok.mllm.towers"):
            caplog.clear()
            want = hf.model.get_image_features(px, vision_feature_layer=-2, vision_feature_select_strategy="default")
            want = torch.stack(list(want.pooler_output))  # [B, 24, D]
            feats = select_features(tower, tower.hidden_states(px)[-2], "default")
            got = hf.model.multi_modal_projector(feats)
        assert want.shape[1] == num_feature_tokens(tower, "default") == 25 - (prefix == 0)  # SigLIP 24, CLIP 25
        torch.testing.assert_close(got, want)
        # SigLIP loses a real patch under "default": said once; CLIP drops its [CLS], nothing to say
        assert ("top-left one is lost" in caplog.text) == (prefix == 0)
        assert num_feature_tokens(tower, "patch") == 25 and num_feature_tokens(tower, "cls_patch") == 25 + prefix


def test_open_clip_tower_keeps_every_patch_when_trained_even_from_a_patch_dropout_config():
    from mmtok import registries

    vision = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "patch_dropout": 0.5}
    tower = registries.get("vision tower").create("open_clip", vision_cfg=vision, embed_dim=16).train()
    states = tower.hidden_states(torch.rand(2, 3, 32, 32))
    assert states[-1].shape == (2, 1 + 16, 32)  # [CLS] + 4 x 4 patches: FLIP's dropout is off in the MLLM

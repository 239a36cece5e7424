"""mmtok's own MAE ViT encoder as the MLLM's vision tower (``mmtok_vit``)."""

from __future__ import annotations

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

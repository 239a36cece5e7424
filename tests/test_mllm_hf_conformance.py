"""mmtok's MLLM against transformers' own LLaVA: same logits (fp32) and same greedy generations."""

from __future__ import annotations

import pytest
import torch

from mmtok.mllm.modeling import MLLM

IMAGE_TOKEN = 120


def _tiny_hf_llava(text_type: str = "llama", select: str = "default"):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.auto import CONFIG_MAPPING

    vision = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2
    )
    text = CONFIG_MAPPING[text_type](
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=2,
    )
    n = 16 + (1 if select == "full" else 0)
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        image_seq_length=n,
        vision_feature_layer=-2,
        vision_feature_select_strategy=select,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random init is tiny; scale up so logits are far from uniform
        for p in model.parameters():
            p.mul_(4.0 if p.ndim > 1 else 1.0)
    return model, n


def _inputs(n: int, batch: int = 1):
    torch.manual_seed(1)
    prompts = []
    for i in range(batch):
        pre = torch.randint(3, 100, (2 + i,))
        post = torch.randint(3, 100, (5,))
        prompts.append(torch.cat([pre, torch.full((n,), IMAGE_TOKEN), post]))
    length = max(len(p) for p in prompts)
    ids = torch.zeros(batch, length, dtype=torch.long)
    att = torch.zeros(batch, length, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = p
        att[i, length - len(p) :] = 1
    pixels = torch.randn(batch, 3, 32, 32)
    return ids, att, pixels


@pytest.mark.parametrize("text_type,select", [("llama", "default"), ("qwen2", "full"), ("mistral", "default")])
def test_logits_match_transformers(tmp_path, text_type, select):
    hf, n = _tiny_hf_llava(text_type, select)
    hf.save_pretrained(tmp_path / "llava")
    ours = MLLM.from_pretrained(tmp_path / "llava").eval()
    assert ours.num_image_tokens == n
    ids, att, pixels = _inputs(n, batch=1)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=att).logits
        got = ours(ids, pixel_values=pixels, attention_mask=att).logits
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # and the same prompt with one <image> placeholder that mmtok expands itself
    short = torch.cat([ids[:, :2], torch.tensor([[IMAGE_TOKEN]]), ids[:, 2 + n :]], dim=1)
    with torch.no_grad():
        got2 = ours(short, pixel_values=pixels).logits
    torch.testing.assert_close(got2, ref, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_matches_transformers(tmp_path):
    hf, n = _tiny_hf_llava("llama")
    hf.save_pretrained(tmp_path / "llava")
    ours = MLLM.from_pretrained(tmp_path / "llava").eval()
    ids, att, pixels = _inputs(n, batch=3)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=att).logits
        got = ours(ids, pixel_values=pixels, attention_mask=att).logits
    valid = att.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_transformers(tmp_path):
    hf, n = _tiny_hf_llava("llama")
    hf.save_pretrained(tmp_path / "llava")
    ours = MLLM.from_pretrained(tmp_path / "llava").eval()
    ids, att, pixels = _inputs(n, batch=2)
    ref = hf.generate(
        input_ids=ids,
        pixel_values=pixels,
        attention_mask=att,
        max_new_tokens=12,
        do_sample=False,
        min_new_tokens=12,
        pad_token_id=0,
    )[:, ids.shape[1] :]
    got = ours.generate(ids, pixel_values=pixels, attention_mask=att, max_new_tokens=12, min_new_tokens=12)
    assert torch.equal(got.sequences, ref), (got.sequences, ref)
    # the cache-free reference path agrees too
    nocache = ours.generate(
        ids, pixel_values=pixels, attention_mask=att, max_new_tokens=12, min_new_tokens=12, use_cache=False
    )
    assert torch.equal(nocache.sequences, ref)


def test_sdpa_stays_enabled(tmp_path):
    hf, _ = _tiny_hf_llava("llama")
    hf.save_pretrained(tmp_path / "llava")
    ours = MLLM.from_pretrained(tmp_path / "llava")
    assert ours.llm.config._attn_implementation == "sdpa"
    assert ours.tower.model.config._attn_implementation == "sdpa"


def test_mmtok_folder_roundtrip(tmp_path):
    hf, n = _tiny_hf_llava("llama")
    hf.save_pretrained(tmp_path / "llava")
    ours = MLLM.from_pretrained(tmp_path / "llava").eval()
    ours.save_pretrained(tmp_path / "mm")
    back = MLLM.from_pretrained(tmp_path / "mm").eval()
    ids, att, pixels = _inputs(n)
    with torch.no_grad():
        torch.testing.assert_close(back(ids, pixel_values=pixels).logits, ours(ids, pixel_values=pixels).logits)


def test_not_a_model_folder(tmp_path):
    from mmtok.hub import CheckpointError

    with pytest.raises(CheckpointError, match="no config.json"):
        MLLM.from_pretrained(tmp_path)

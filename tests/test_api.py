"""The Python API: lazy package exports and the one-line loaders of mmtok.api (tokenizer, encoder, MLLM)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_fashion_mllm, tiny_seg_heads, tiny_seg_mllm

from mmtok import api, registries


def _pil(size=32, seed=0, mode="RGB"):
    arr = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    im = Image.fromarray(arr)
    return im.convert(mode) if mode != "RGB" else im


def test_lazy_exports_keep_import_cheap():
    code = (
        "import sys, mmtok, mmtok.mllm; assert 'torch' not in sys.modules, 'torch imported';"
        "from mmtok.mllm import MLLM, SegOutput, Pruner; assert 'torch' in sys.modules;"
        "from mmtok.mllm.modeling import MLLM as M; assert MLLM is M;"
        "from mmtok.mim import MAE, load_hf_vitmae; import mmtok.api as a; assert mmtok.load_mllm is a.load_mllm"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    with pytest.raises(AttributeError):
        import mmtok.mllm

        mmtok.mllm.NotAThing  # noqa: B018


def test_load_tokenizer_encode_decode_pil(tmp_path):
    torch.manual_seed(0)
    tok = registries.get("tokenizer").create("vq_tiny_f4", image_size=32, codebook_size=64, kmeans_init=False)
    tok.save_pretrained(tmp_path / "tok")
    t = api.load_tokenizer(tmp_path / "tok")
    img = _pil(48)  # RGB, 48 px -> the tokenizer's grey 32 px
    ids = t.encode(img)
    assert ids.shape == (8, 8) and ids.dtype == torch.long and int(ids.max()) < 64
    rec = t.decode(ids)
    assert isinstance(rec, Image.Image) and rec.size == (32, 32) and rec.mode == "L"
    # the same as the model on the same prepared input (resize, luminance, [-1, 1])
    x = torch.nn.functional.interpolate(
        torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None],
        size=(32, 32),
        mode="bilinear",
        antialias=True,
    )
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    with torch.no_grad():
        assert torch.equal(tok.eval().encode(grey * 2 - 1).indices[0], ids)
    batch = t.encode([img, _pil(32, seed=1)])
    assert batch.shape == (2, 8, 8) and len(t.decode(batch)) == 2


def test_load_encoder_features_for_a_batch_of_pil_images(tmp_path):
    torch.manual_seed(0)
    mae = registries.get("mim model").create(
        "mae",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_dim=16,
        decoder_depth=1,
        decoder_heads=2,
    )
    mae.save_pretrained(tmp_path / "mae")
    enc = api.load_encoder(tmp_path / "mae")
    imgs = [_pil(32), _pil(32, seed=1)]
    feats = enc.features(imgs)
    assert feats.shape == (2, 32)
    x = torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 255).permute(2, 0, 1) for i in imgs])
    with torch.no_grad():
        torch.testing.assert_close(feats, mae.eval().encoder.pooled_features(x))
    assert not torch.allclose(feats[0], feats[1])
    assert enc.tokens(imgs).shape == (2, 17, 32)


def test_load_encoder_from_an_official_mae_file(tmp_path):
    from test_convert import _official_state

    torch.save({"model": _official_state(decoder=False)}, tmp_path / "mae.pth")
    enc = api.load_encoder(tmp_path / "mae.pth")
    assert enc.features([_pil(16)]).shape == (1, 32)


# ---------------------------------------------------------------------------------------------------------------
# MLLM
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mllm_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = registries.get("mllm").create("llava_fashion_small", **tiny_fashion_mllm("llama"))
    out = tmp_path_factory.mktemp("mllm") / "model"
    model.save_pretrained(out)
    return out


def test_answer_with_and_without_pruning(mllm_dir):
    mllm = api.load_mllm(mllm_dir)
    img = _pil(32)
    ans = mllm.answer(img, "how many items are there ?", prune="dart", keep=5, max_new_tokens=4)
    assert isinstance(ans, api.Answer) and isinstance(ans.text, str)
    assert ans.method == "dart" and ans.num_image_tokens == 16 and ans.notes == []
    assert len(ans.image_keep) == 5 and ans.image_keep == sorted(ans.image_keep) and max(ans.image_keep) < 16
    assert 0 < ans.prefill_seconds <= ans.total_seconds
    plain = mllm.answer(img, "how many items are there ?", prune=None, max_new_tokens=4)
    assert plain.image_keep is None and plain.method == "none"
    # the same text the model gives through its own generate()
    from mmtok.mllm.text import chat_prompt, decode_answers, encode_prompts

    tok = mllm.model.tokenizer
    ids, att = encode_prompts(tok, [chat_prompt(tok, "how many items are there ?")])
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    out = mllm.model.generate(ids, x, att, max_new_tokens=4, eos_token_id=tok.eos_token_id)
    assert plain.text == decode_answers(tok, out.sequences)[0]


def test_answer_reports_adaptations_one_line_each(mllm_dir):
    mllm = api.load_mllm(mllm_dir)
    ans = mllm.answer(_pil(64), "how many zorblaxes are there ?", prune="fastv", keep=1000, max_new_tokens=2)
    assert len(ans.notes) == 3
    unknown, keep, resize = ans.notes
    assert "'zorblaxes'" in unknown and "unknown" in unknown
    assert "keep 1000" in keep and "16" in keep and len(ans.image_keep) == 16
    assert "64x64" in resize and "32x32" in resize


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"question": "<image> how many ?"}, "<image>"),
        ({"question": "how many ? " * 500}, "characters"),
        ({"question": "   "}, "empty"),
        ({"prune": "darts"}, "unknown pruning method 'darts'"),
        ({"prune": "fastv", "layer": 3}, "layer 3 is out of range: this LLM has 3 layers"),
        ({"prune": "cls_attention", "layer": 1}, "takes no layer"),
        ({"keep": 0}, "keep must be an integer >= 1"),
    ],
)
def test_answer_refuses_bad_input(mllm_dir, kwargs, match):
    mllm = api.load_mllm(mllm_dir)
    args = {"image": _pil(32), "question": "how many items ?", **kwargs}
    with pytest.raises(api.InputError, match=match):
        mllm.answer(**args)


def test_segment_on_a_model_with_heads(tmp_path):
    torch.manual_seed(0)
    model = registries.get("mllm").create("llava_fashion_seg", **tiny_seg_mllm(), seg_heads=tiny_seg_heads())
    model.save_pretrained(tmp_path / "seg")
    mllm = api.load_mllm(tmp_path / "seg")
    seg = mllm.segment(_pil(48), "the red bag", head="allmask", prune="random", keep=4)
    assert seg.mask.shape == (48, 48) and seg.mask.dtype == bool
    assert seg.scores.shape == (4, 4) and len(seg.image_keep) == 4 and seg.text is None
    assert any("48x48" in n for n in seg.notes)
    text = mllm.segment(_pil(32), "the red bag", head="text")
    assert isinstance(text.text, str) and text.mask.shape == (32, 32)
    with pytest.raises(api.InputError, match="no 'nope' head"):
        mllm.segment(_pil(32), "the red bag", head="nope")


# ---------------------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------------------
def test_load_image_16_bit_png_and_bombs(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")  # what Pillow gives for a 16-bit greyscale PNG
    x = api.load_image(tmp_path / "deep.png")
    assert x.shape == (3, 64, 64)
    torch.testing.assert_close(x[0], torch.from_numpy(ramp.astype(np.float32) / 65535), atol=1e-6, rtol=0)
    assert 0.45 < float(x.mean()) < 0.55  # not all white
    with pytest.raises(api.InputError, match="pixels, more than"):
        api.load_image(tmp_path / "deep.png", max_pixels=1000)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(api.InputError, match="cannot be read"):
        api.load_image(tmp_path / "junk.png")
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert float(api.load_image(rgba).min()) == 1.0  # transparent -> white background

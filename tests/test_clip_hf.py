"""``mmtok convert clip-hf``: the clip task's open_clip folder as a transformers ``CLIPModel`` folder.

A tiny open_clip CLIP is built by the clip task itself (``ClipTask``, open_clip's factory classes) with every
parameter perturbed (LayerNorm gains, biases and the logit scale away from their init values, so a swapped or
missing tensor shows), exported with the task's ``export``, converted, and compared with open_clip: embeddings,
logits, the tokenizer's ids, and the MLLM's ``hf_clip`` tower against its ``open_clip`` tower.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

# 32 px, patch 8 -> 16 patches; two blocks per tower so a per-layer mix-up shows
TINY_VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "patch_dropout": 0.5}
TINY_TEXT = {"context_length": 40, "width": 32, "heads": 2, "layers": 2}
CAPTIONS = [
    "a red sneaker on the left and a blue bag at the top",
    "an orange bag at the top right",
    "a white ankle boot in the center and a green shirt on the right",
]
ATOL = 1e-5


@pytest.fixture(scope="module")
def open_clip_folder(tmp_path_factory):
    """An open_clip hub folder written by the clip task's own export, with random non-init weights."""
    from mmtok.clip.tasks import ClipTask, ClipTaskConfig

    torch.manual_seed(1)
    task = ClipTask(ClipTaskConfig(embed_dim=16, vision=dict(TINY_VISION), text=dict(TINY_TEXT)))
    with torch.no_grad():
        for p in task.model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # LayerNorm (1, 0) and zero biases become distinct values
    out = tmp_path_factory.mktemp("oc") / "export"
    task.export(out)
    return out


def _variant(src, dst, model_cfg_edit):
    """A copy of ``src`` whose ``model_cfg`` is changed by ``model_cfg_edit(model_cfg)`` (same weight file)."""
    shutil.copytree(src, dst)
    path = dst / "open_clip_config.json"
    meta = json.loads(path.read_text())
    model_edit = model_cfg_edit(meta["model_cfg"])
    if model_edit is not None:
        meta["model_cfg"] = model_edit
    path.write_text(json.dumps(meta))
    return dst


def _quick_gelu_eps(cfg):
    cfg["quick_gelu"] = True
    for tower in ("vision_cfg", "text_cfg"):
        cfg[tower]["norm_kwargs"] = {"eps": 1e-6}


def _argmax_pool(cfg):
    cfg["text_cfg"]["pool_type"] = "argmax"


@pytest.mark.parametrize("variant", ["task", "quick_gelu_eps", "argmax_pool"])
def test_hf_clip_matches_open_clip(open_clip_folder, tmp_path, variant):
    import open_clip
    from transformers import AutoTokenizer, CLIPModel

    from mmtok.clip.captions import CaptionTokenizer
    from mmtok.clip.hf_export import export_clip_hf

    src = open_clip_folder
    if variant == "quick_gelu_eps":  # the other activation and epsilon must travel too
        src = _variant(open_clip_folder, tmp_path / "src", _quick_gelu_eps)
    elif variant == "argmax_pool":  # open_clip's 'argmax' pooling is transformers' legacy eos_token_id=2
        src = _variant(open_clip_folder, tmp_path / "src", _argmax_pool)
    res = export_clip_hf(src, tmp_path / "hf")
    assert res.image_max_abs <= ATOL and res.text_max_abs <= ATOL and res.tokenizer

    oc = open_clip.create_model(f"local-dir:{src}").eval()
    hf = CLIPModel.from_pretrained(str(tmp_path / "hf"), use_safetensors=True).eval()
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    act = "quick_gelu" if variant == "quick_gelu_eps" else "gelu"  # never transformers' default by accident
    eps = 1e-6 if variant == "quick_gelu_eps" else 1e-5
    for tower in ("text_config", "vision_config"):
        assert cfg[tower]["hidden_act"] == act and cfg[tower]["layer_norm_eps"] == eps
    assert cfg["text_config"]["eos_token_id"] == (2 if variant == "argmax_pool" else 3)

    # the transformers tokenizer gives the task's ids (words, </s>, <pad> to the right)
    ids = CaptionTokenizer(str(open_clip_folder), TINY_TEXT["context_length"])(CAPTIONS)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    enc = hf_tok(CAPTIONS, padding="max_length", max_length=TINY_TEXT["context_length"], return_tensors="pt")
    assert torch.equal(enc["input_ids"], ids)

    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        img_oc, txt_oc = oc.encode_image(images), oc.encode_text(ids)
        img_hf = hf.get_image_features(pixel_values=images).pooler_output
        txt_hf = hf.get_text_features(**enc).pooler_output  # with the tokenizer's attention mask
        out = hf(input_ids=ids, pixel_values=images)
        logits_oc = oc.logit_scale.exp() * F.normalize(img_oc, dim=-1) @ F.normalize(txt_oc, dim=-1).T  # [4, 3]
    assert img_hf.shape == (4, 16) and txt_hf.shape == (3, 16)
    assert (img_hf - img_oc).abs().max() <= ATOL
    assert (txt_hf - txt_oc).abs().max() <= ATOL
    assert (out.logits_per_image - logits_oc).abs().max() <= ATOL * float(oc.logit_scale.detach().exp())
    assert torch.allclose(out.logits_per_text, out.logits_per_image.T)
    assert torch.allclose(hf.logit_scale, oc.logit_scale.reshape(()))
    # the captions are told apart (the comparison is not between constant embeddings)
    assert (txt_oc[0] - txt_oc[1]).abs().max() > 100 * ATOL


def test_hf_clip_tower_matches_open_clip_tower(open_clip_folder, tmp_path):
    from mmtok.clip.hf_export import export_clip_hf
    from mmtok.mllm import towers
    from mmtok.registries import VISION_TOWERS

    res = export_clip_hf(open_clip_folder, tmp_path / "hf")
    oc_tower = VISION_TOWERS.create("open_clip", checkpoint=str(open_clip_folder)).eval()
    hf_tower = VISION_TOWERS.create("hf_clip", path=str(res.out / "vision_model"), mean=res.mean, std=res.std).eval()
    for attr in ("num_layers", "hidden_size", "num_prefix_tokens", "image_size", "patch_size"):
        assert getattr(hf_tower, attr) == getattr(oc_tower, attr), attr
    images = torch.rand(2, 3, 40, 40)  # [0, 1] pixels at another size: both towers resize and normalise alike
    with torch.no_grad():
        x_oc, x_hf = oc_tower.preprocess(images), hf_tower.preprocess(images)
        hs_oc, hs_hf = oc_tower.hidden_states(x_oc), hf_tower.hidden_states(x_hf)
        assert torch.allclose(x_oc, x_hf)
        assert len(hs_oc) == len(hs_hf) == TINY_VISION["layers"] + 1
        for i, (a, b) in enumerate(zip(hs_oc, hs_hf)):  # index 0 = embeddings after ln_pre, i = block i
            assert (a - b).abs().max() <= ATOL, f"hidden state {i}"
        # the LLaVA feature layer (penultimate block, [CLS] dropped) the MLLM feeds the LLM
        feat_oc = towers.select_features(oc_tower, hs_oc[-2], "patch")
        feat_hf = towers.select_features(hf_tower, hs_hf[-2], "patch")
        assert feat_hf.shape == (2, 16, 32)
        assert (feat_oc - feat_hf).abs().max() <= ATOL
        # the [CLS] attention rows the pruners read agree too
        for block in range(TINY_VISION["layers"]):
            row_oc = towers.cls_attention_row(oc_tower, hs_oc, block)
            row_hf = towers.cls_attention_row(hf_tower, hs_hf, block)
            assert (row_oc - row_hf).abs().max() <= ATOL


def _set(tower, key, value):
    def edit(cfg):
        cfg[tower][key] = value

    return edit


def _top(key, value):
    def edit(cfg):
        cfg[key] = value

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (_set("vision_cfg", "ls_init_value", 1e-5), "ls_init_value"),
        (_set("text_cfg", "ls_init_value", 1e-5), "ls_init_value"),
        (_set("vision_cfg", "attentional_pool", True), "attentional_pool"),
        (_set("vision_cfg", "pool_type", "avg"), "pool_type='avg'"),
        (_set("text_cfg", "pool_type", "last"), "pool_type='last'"),
        (_set("text_cfg", "eos_id", 2), "eos_id=2"),
        (_set("text_cfg", "proj_bias", True), "proj_bias"),
        (_set("text_cfg", "embed_cls", True), "embed_cls"),
        (_set("text_cfg", "no_causal_mask", True), "no_causal_mask"),
        (_set("vision_cfg", "qk_norm", True), "custom attention blocks"),
        (_set("vision_cfg", "no_ln_pre", True), "no_ln_pre"),
        (_set("vision_cfg", "image_size", [32, 48]), "not square"),
        (_top("init_logit_bias", -10.0), "logit bias"),
        (_top("multimodal_cfg", {"width": 32}), "multimodal_cfg"),
    ],
)
def test_refuses_configs_hf_clip_cannot_represent(open_clip_folder, tmp_path, edit, match):
    from mmtok.clip.hf_export import ClipHFExportError, export_clip_hf

    src = _variant(open_clip_folder, tmp_path / "src", edit)
    with pytest.raises(ClipHFExportError, match=match) as info:
        export_clip_hf(src, tmp_path / "hf")
    assert "keep the open_clip folder" in str(info.value) or "inconsistent" in str(info.value)
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_refuses_an_eos_that_contradicts_the_tokenizer(open_clip_folder, tmp_path):
    from mmtok.clip.hf_export import ClipHFExportError, export_clip_hf

    src = _variant(open_clip_folder, tmp_path / "src", _set("text_cfg", "eos_id", 5))
    with pytest.raises(ClipHFExportError, match="tokenizer has </s> = 3"):
        export_clip_hf(src, tmp_path / "hf")


def test_convert_cli(open_clip_folder, tmp_path, capsys):
    from mmtok.cli.main import main

    out = tmp_path / "hf"
    assert main(["convert", "clip-hf", "--src", str(open_clip_folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CLIPModel" in printed and '"name": "hf_clip"' in printed
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "vision_model" / "config.json").read_text())["model_type"] == "clip_vision_model"
    # mistakes: one line on stderr, exit status 2
    assert main(["convert", "clip-hf", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "not an exported CLIP folder" in capsys.readouterr().err


def test_hf_clip_tower_loads_the_whole_clip_folder_with_its_normalisation(open_clip_folder, tmp_path):
    """The ``--out`` folder itself (a CLIPModel) works as the tower: its vision half, and the mean/std of its
    preprocessor_config.json without passing them."""
    from mmtok.clip.hf_export import export_clip_hf
    from mmtok.registries import VISION_TOWERS

    res = export_clip_hf(open_clip_folder, tmp_path / "hf")
    whole = VISION_TOWERS.create("hf_clip", path=str(res.out)).eval()
    half = VISION_TOWERS.create("hf_clip", path=str(res.out / "vision_model"), mean=res.mean, std=res.std).eval()
    assert whole.pixel_mean.flatten().tolist() == pytest.approx(list(res.mean))
    images = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        a = whole.hidden_states(whole.preprocess(images))
        b = half.hidden_states(half.preprocess(images))
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))

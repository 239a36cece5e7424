"""The MLLM itself: LLaVA feature strategies on SigLIP / CLIP towers (against transformers), family-correct logits,
the tokenizer saved in a model folder read from that folder, and the import graph of mmtok.mllm's core modules."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_seg_mllm

from mmtok import hub, registries
from mmtok.mllm.modeling import MLLM

IMAGE_TOKEN = 120
REPO = Path(__file__).resolve().parents[1]
# 20 px images, patch 4: a 5 x 5 grid of 25 patches
SIGLIP = {"image_size": 20, "patch_size": 4, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3}
LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "eos_token_id": 2,
}


def _siglip_llava(folder: Path, select: str) -> tuple[torch.nn.Module, int]:
    """A random transformers LLaVA with a SigLIP tower, saved (safetensors) to ``folder``; returns it and N."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    n = 25 - (select == "default")  # "default" drops token 0, a real patch on SigLIP (no [CLS])
    cfg = LlavaConfig(
        vision_config=SiglipVisionConfig(**SIGLIP, num_attention_heads=2),
        text_config=dict(LLAMA),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=n,
        vision_feature_layer=-2,
        vision_feature_select_strategy=select,
    )
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random init is tiny; scale up so logits are far from uniform
        for p in hf.parameters():
            p.mul_(4.0 if p.ndim > 1 else 1.0)
    hf.save_pretrained(folder, safe_serialization=True)
    assert (folder / "model.safetensors").is_file()
    return hf, n


def _prompt(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randint(3, 100, (3,), generator=g), torch.full((n,), IMAGE_TOKEN)])
    ids = torch.cat([ids, torch.randint(3, 100, (4,), generator=g)])[None]
    return ids, torch.randn(1, 3, 20, 20, generator=g)


@pytest.mark.parametrize("select, stored", [("default", "default"), ("full", "cls_patch")])
def test_siglip_llava_matches_transformers(tmp_path, caplog, select, stored):
    """LLaVA's "default" on SigLIP feeds 24 of the 25 patches, as transformers does; "full" feeds all 25."""
    hf, n = _siglip_llava(tmp_path / "llava", select)
    with caplog.at_level("WARNING", logger="mmtok.mllm.towers"):
        ours = MLLM.from_pretrained(tmp_path / "llava").eval()
    assert ours.tower.num_patches == 25 and ours.tower.num_prefix_tokens == 0
    assert ours.num_image_tokens == n == (24 if select == "default" else 25)
    assert ours.config.feature_select == stored
    assert ("top-left one is lost" in caplog.text) == (select == "default")  # said when a patch is lost
    ids, pixels = _prompt(n)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixel_values=pixels).logits
        # one placeholder, expanded by mmtok to the same N tokens
        short = torch.cat([ids[:, :3], ids.new_tensor([[IMAGE_TOKEN]]), ids[:, 3 + n :]], dim=1)
        got_short = ours(short, pixel_values=pixels).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_short, ref, atol=1e-5, rtol=1e-5)


def test_wrong_placeholder_count_names_the_cause(tmp_path):
    """A processor written for 25 patches gives 25 placeholders; the error says why this model wants 24."""
    _siglip_llava(tmp_path / "llava", "default")
    ours = MLLM.from_pretrained(tmp_path / "llava").eval()
    ids, pixels = _prompt(25)
    with pytest.raises(ValueError, match="24 image tokens per image") as err:
        ours(ids, pixel_values=pixels)
    assert "drops patch 0" in str(err.value) and "feature_select='patch'" in str(err.value)


def _tiny_llava(**overrides):
    torch.manual_seed(0)
    return registries.get("mllm").create("llava", image_token_id=IMAGE_TOKEN, **overrides)


def test_feature_select_accepts_llava_names_and_stores_the_equivalent():
    """On a CLIP tower (one [CLS]) "default" is "patch" and "full" is "cls_patch"; unknown names are refused."""
    for select, stored, n in (("patch", "patch", 64), ("default", "patch", 64), ("cls_patch", "cls_patch", 65)):
        m = _tiny_llava(feature_select=select)
        assert (m.config.feature_select, m.num_image_tokens) == (stored, n)
    assert _tiny_llava(feature_select="full").config.feature_select == "cls_patch"
    with pytest.raises(ValueError, match="feature_select must be one of"):
        _tiny_llava(feature_select="cls")


def test_seg_heads_take_default_on_a_cls_tower_and_refuse_it_on_siglip():
    """Per-patch heads need one image token per patch: LLaVA's "default" gives that on a [CLS] tower only."""
    torch.manual_seed(0)
    spec = {**tiny_seg_mllm(), "feature_select": "default", "seg_heads": {"allmask": {}}}
    model = registries.get("mllm").create("llava_fashion_seg", **spec)
    assert model.config.feature_select == "patch" and model.num_image_tokens == model.tower.num_patches == 16
    siglip = {"name": "hf_siglip", "config": {**SIGLIP, "num_attention_heads": 2, "image_size": 16}}
    with pytest.raises(ValueError, match="one image token per patch"):
        registries.get("mllm").create("llava_fashion_seg", **{**spec, "tower": siglip})


# -- logits ------------------------------------------------------------------------------------------------------
GRANITE = {
    **LLAMA,
    "model_type": "granite",
    "logits_scaling": 4.0,
    "embedding_multiplier": 3.0,
    "residual_multiplier": 0.5,
    "attention_multiplier": 0.2,
}


def test_loss_and_logits_use_the_family_head():
    """Built from a Granite config, the MLLM scores text as GraniteForCausalLM does (logits / logits_scaling)."""
    model = _tiny_llava(llm=GRANITE).eval()
    assert model.config.logits_convention == "causal_lm"
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.llm(input_ids=ids, labels=ids)  # transformers' own forward of the same weights
        got = model(ids, labels=ids)
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=1e-5)
    # sampling in generate() draws from the same distribution: the first step's logits equal the forward's
    with torch.no_grad():
        prep = model.prepare(ids)
        out, _ = model._run(prep, None, use_cache=False)
        torch.testing.assert_close(model.lm_logits(out.hidden[:, -1]), ref.logits[:, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="logits_convention must be one of"):
        _tiny_llava(logits_convention="plain")


def test_llava_checkpoint_keeps_llavas_plain_head_after_a_save(tmp_path):
    """transformers' LLaVA skips the text family's logits scaling: so does a loaded checkpoint, saved or not."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=dict(GRANITE), image_token_index=IMAGE_TOKEN, image_seq_length=4
    )
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = MLLM.from_pretrained(tmp_path / "hf").eval()
    assert ours.config.logits_convention == "llava"
    ours.save_pretrained(tmp_path / "mm")
    back = MLLM.from_pretrained(tmp_path / "mm").eval()
    assert back.config.logits_convention == "llava"
    ids = torch.cat([torch.tensor([[5, 6]]), torch.full((1, 4), IMAGE_TOKEN), torch.tensor([[7, 8, 9]])], dim=1)
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(back(ids, pixel_values=pixels).logits, ref, atol=1e-5, rtol=1e-5)


# -- the tokenizer of a model folder -------------------------------------------------------------------------------
def test_folder_tokenizer_is_read_from_the_folder_not_the_cwd(tmp_path, monkeypatch):
    a = _tiny_llava(tokenizer="builtin:fashion")
    a.save_pretrained(tmp_path / "a")
    assert a.config.tokenizer == "builtin:fashion"  # saving writes "." into the folder, not into the live config
    b = _tiny_llava(tokenizer="builtin:fashion-seg")
    b.save_pretrained(tmp_path / "b")
    want = a.tokenizer.get_vocab()
    assert want != b.tokenizer.get_vocab()

    monkeypatch.chdir(tmp_path / "b")  # inside another model folder, whose tokenizer "." would name
    got = MLLM.from_pretrained("../a")
    assert got.tokenizer.get_vocab() == want
    monkeypatch.chdir(tmp_path / "a")
    assert MLLM.from_pretrained(".").tokenizer.get_vocab() == want
    # the loaded config names the folder absolutely: rebuilding it elsewhere reads the same tokenizer
    monkeypatch.chdir(REPO)
    assert MLLM(copy.deepcopy(got.config)).tokenizer.get_vocab() == want
    # the generic loader cannot know the folder: it refuses "." instead of reading the current directory's
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(ValueError, match=r"MLLM\.from_pretrained"):
        hub.from_pretrained("../a", kind="mllm")


def test_hf_llava_tokenizer_is_read_from_its_folder(tmp_path, monkeypatch):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from mmtok.mllm.text import build_fashion_tokenizer, load_tokenizer

    vision = CLIPVisionConfig(
        image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    hf = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=dict(LLAMA)))
    hf.save_pretrained(tmp_path / "hf")
    hf.save_pretrained(tmp_path / "bare")  # no tokenizer files
    build_fashion_tokenizer().save_pretrained(tmp_path / "hf")
    build_fashion_tokenizer(seg=True).save_pretrained(tmp_path / "other")
    want = build_fashion_tokenizer().get_vocab()

    monkeypatch.chdir(tmp_path / "other")
    model = MLLM.from_pretrained("../hf")
    assert model.tokenizer.get_vocab() == want
    monkeypatch.chdir(REPO)
    assert load_tokenizer(model.config.tokenizer).get_vocab() == want
    # an explicit tokenizer is used for a folder that has none
    bare = MLLM.from_pretrained(tmp_path / "bare", tokenizer="builtin:fashion")
    assert bare.tokenizer is not None and bare.tokenizer.get_vocab() == want


# -- imports -------------------------------------------------------------------------------------------------------
def _mllm_imports(path: Path) -> set[str]:
    """mmtok.mllm modules a file imports anywhere (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("mmtok.mllm.")}


def test_modeling_hf_llava_and_text_import_no_circle():
    mllm = REPO / "mmtok" / "mllm"
    graph = {f"mmtok.mllm.{n}": _mllm_imports(mllm / f"{n}.py") for n in ("modeling", "hf_llava", "text")}
    for mod, deps in graph.items():
        for dep in deps & set(graph):
            assert mod not in graph[dep], f"{mod} and {dep} import each other"
    # the names other modules use stay where they were
    from mmtok.mllm.modeling import _llm_dict, resolve_package_file  # noqa: F401
    from mmtok.mllm.text import resolve_package_file as moved

    assert resolve_package_file is moved and resolve_package_file("x/y.gguf") == "x/y.gguf"

"""An exported open_clip CLIP folder -> a transformers ``CLIPModel`` folder, by weight mapping (no retraining).

CLIP ("Learning Transferable Visual Models From Natural Language Supervision", Radford et al., arXiv:2103.00020;
reference implementations openai/CLIP and mlfoundations/open_clip; transformers' ``clip`` is the target). The
``clip`` task (:mod:`mmtok.clip.tasks`) trains open_clip's own ``CLIP`` and exports an open_clip hub folder
(``open_clip_config.json`` + ``open_clip_model.safetensors`` + a word-level ``tokenizer.json``). This module writes
the same weights as a transformers folder:

* ``config.json`` + ``model.safetensors`` of a ``CLIPModel`` (``save_pretrained(safe_serialization=True)``);
* ``vision_model/``: the image tower alone as a ``CLIPVisionModel`` folder. The MLLM's ``hf_clip`` tower loads
  ``AutoModel`` from a folder and needs a vision model, not the two-tower ``CLIPModel``;
* ``tokenizer.json`` + ``tokenizer_config.json``: the word-level tokenizer as a ``PreTrainedTokenizerFast`` whose
  post-processor appends ``</s>``. Then ``tokenizer(captions, padding="max_length", max_length=context_length)``
  gives the ids the CLIP task trained on (words, ``</s>``, ``<pad>`` to the right);
* ``preprocessor_config.json``: a ``CLIPImageProcessor`` carrying the folder's image size and mean/std.

The mapping, open_clip -> transformers: ``conv1`` -> ``patch_embedding``, ``class_embedding`` and the position
tables as they are, ``ln_pre``/``ln_post`` -> ``pre_layrnorm``/``post_layernorm``, each block's fused
``attn.in_proj_{weight,bias}`` split into ``q_proj``/``k_proj``/``v_proj`` (rows in that order),
``mlp.c_fc``/``mlp.c_proj`` -> ``fc1``/``fc2``, ``ln_final`` -> ``final_layer_norm``, the ``[width, embed]``
projection matrices transposed into bias-free ``Linear`` weights, ``logit_scale`` as a 0-dim parameter.

What has to agree, besides the weights (each is read from the source config, never assumed):

* the activation: open_clip uses exact ``nn.GELU`` unless the config says ``quick_gelu``; transformers' CLIP
  defaults to ``quick_gelu`` (OpenAI's), so the export always writes ``hidden_act`` explicitly;
* the LayerNorm epsilon (open_clip 1e-5 unless ``norm_kwargs.eps``);
* text pooling: the CLIP task pools the first ``</s>`` (open_clip ``pool_type="eos"``). transformers pools the first
  ``eos_token_id`` of the text config, except that an ``eos_token_id`` of 2 selects its legacy ``argmax(input_ids)``
  pooling, which is exactly open_clip's ``pool_type="argmax"``. So ``"eos"`` exports with the tokenizer's eos id
  (refused when that id is 2), ``"argmax"`` exports with 2.

open_clip configs that a transformers CLIP cannot represent are refused before any weight is read (layer scale,
attentional pooling, average or no pooling, custom attention blocks, a timm or HF text tower, no ``ln_pre``, a
[CLS] text token, a bidirectional text tower, a projection bias, a logit bias, non-square images or patches). The
conversion is checked before the folder is written: the transformers model must give open_clip's image and text
embeddings on random inputs (to ``check_atol``), otherwise nothing is written.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmtok.clip.tasks import ClipConfigError

logger = logging.getLogger(__name__)

__all__ = ["ClipHFExport", "ClipHFExportError", "export_clip_hf", "hf_clip_config", "open_clip_to_hf"]

# open_clip's LayerNorm default (torch's), used when the config has no norm_kwargs
OPEN_CLIP_LN_EPS = 1e-5
# custom-block switches of CLIPVisionCfg / CLIPTextCfg: any of them gives a block transformers' CLIP does not have
CUSTOM_BLOCK_FIELDS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
# model_cfg keys this converter understands; others (multimodal_cfg of CoCa, ...) are refused
MODEL_CFG_KEYS = {
    "embed_dim",
    "vision_cfg",
    "text_cfg",
    "quick_gelu",
    "cast_dtype",
    "custom_text",
    "nonscalar_logit_scale",
    "init_logit_scale",
    "init_logit_bias",
}


class ClipHFExportError(ClipConfigError):
    """An open_clip folder that a transformers ``CLIPModel`` cannot represent (the message says what differs)."""


@dataclass
class ClipHFExport:
    """What :func:`export_clip_hf` wrote and how closely the result matches open_clip.

    ``image_max_abs`` / ``text_max_abs`` are the largest absolute differences between the two models' unit-norm
    embeddings on the self-check's random images and random token sequences (fp32; values in [0, 2]).
    """

    out: Path
    image_max_abs: float
    text_max_abs: float
    tokenizer: bool  # a transformers tokenizer was written
    config: Any  # the transformers CLIPConfig
    mean: list[float]  # pixel normalisation of the source (preprocess_cfg), for the MLLM tower's config
    std: list[float]


# ----------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------
def _refuse(what: str, why: str) -> None:
    raise ClipHFExportError(
        f"{what}: {why}. transformers' CLIPModel has no equivalent, so the weights cannot be exported without "
        "changing what the model computes; keep the open_clip folder for this model (open_clip and the MLLM's "
        "open_clip tower load it)"
    )


def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(int(v) for v in value)) != 1:
            _refuse(what, f"{tuple(value)} is not square (transformers' CLIP takes one integer)")
        value = value[0]
    return int(value)


def _ln_eps(cfg: dict[str, Any], what: str) -> float:
    norm = dict(cfg.get("norm_kwargs") or {})
    extra = sorted(set(norm) - {"eps"})
    if extra:
        _refuse(f"{what}.norm_kwargs", f"{extra} change the LayerNorm beyond its epsilon")
    return float(norm.get("eps", OPEN_CLIP_LN_EPS))


def _common_checks(cfg: dict[str, Any], what: str) -> None:
    if cfg.get("ls_init_value") is not None:
        _refuse(f"{what}.ls_init_value={cfg['ls_init_value']}", "layer scale multiplies each residual branch")
    custom = [k for k in CUSTOM_BLOCK_FIELDS if cfg.get(k)]
    if custom or cfg.get("block_type") not in (None, "default"):
        _refuse(f"{what}", f"custom attention blocks ({custom or cfg.get('block_type')})")
    if cfg.get("act_kwargs"):
        _refuse(f"{what}.act_kwargs={cfg['act_kwargs']}", "the activation takes extra arguments")


def hf_clip_config(model_cfg: dict[str, Any], eos_id: int | None = None, bos_id: int | None = None):
    """The transformers ``CLIPConfig`` equivalent to an open_clip ``model_cfg`` (``open_clip_config.json``).

    Args:
        model_cfg: open_clip's ``model_cfg`` dict (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...).
        eos_id: The tokenizer's ``</s>`` id, if known; checked against ``text_cfg.eos_id`` for ``pool_type="eos"``.
        bos_id: The tokenizer's ``<s>`` id, if known (recorded in the text config; CLIP does not use it).

    Raises:
        ClipHFExportError: a config transformers' CLIP cannot represent (see the module docstring).
    """
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    unknown = sorted(set(model_cfg) - MODEL_CFG_KEYS)
    if unknown:
        _refuse(f"model_cfg {unknown}", "these keys belong to other open_clip model families (e.g. CoCa)")
    if model_cfg.get("init_logit_bias") is not None:
        _refuse("model_cfg.init_logit_bias", "a logit bias is SigLIP's sigmoid loss, CLIPModel has none")
    embed_dim = int(model_cfg["embed_dim"])
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"  # open_clip: nn.GELU unless quick_gelu

    v = dict(model_cfg.get("vision_cfg") or {})
    if v.get("timm_model_name"):
        _refuse("vision_cfg.timm_model_name", "a timm image tower")
    if isinstance(v.get("layers", 12), (list, tuple)):
        _refuse("vision_cfg.layers", "a ModifiedResNet image tower")
    _common_checks(v, "vision_cfg")
    if v.get("attentional_pool"):
        _refuse("vision_cfg.attentional_pool", "attentional pooling replaces the [CLS] token")
    if v.get("pool_type", "tok") != "tok":
        _refuse(f"vision_cfg.pool_type={v['pool_type']!r}", "CLIPModel pools the [CLS] token only ('tok')")
    if v.get("no_ln_pre"):
        _refuse("vision_cfg.no_ln_pre", "CLIPModel always normalises the embeddings (pre_layrnorm)")
    if v.get("pos_embed_type", "learnable") not in ("learnable", "sin_cos_2d"):  # both are stored tables
        _refuse(f"vision_cfg.pos_embed_type={v['pos_embed_type']!r}", "unknown position embedding")
    width, head_width = int(v.get("width", 768)), int(v.get("head_width", 64))
    if width % head_width:
        _refuse("vision_cfg", f"width {width} is not a multiple of head_width {head_width}")
    image_size = _square(v.get("image_size", 224), "vision_cfg.image_size")
    patch_size = _square(v.get("patch_size", 16), "vision_cfg.patch_size")
    if image_size % patch_size:
        _refuse("vision_cfg", f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    # final_ln_after_pool is the same computation for [CLS] pooling (LayerNorm acts per token)
    vision = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(width * float(v.get("mlp_ratio", 4.0))),
        num_hidden_layers=int(v.get("layers", 12)),
        num_attention_heads=width // head_width,
        num_channels=3,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act=act,
        layer_norm_eps=_ln_eps(v, "vision_cfg"),
        projection_dim=embed_dim,
    )

    t = dict(model_cfg.get("text_cfg") or {})
    if t.get("hf_model_name"):
        _refuse("text_cfg.hf_model_name", "a transformers text tower inside open_clip")
    _common_checks(t, "text_cfg")
    if t.get("embed_cls"):
        _refuse("text_cfg.embed_cls", "a [CLS] token appended to the text")
    if t.get("no_causal_mask"):
        _refuse("text_cfg.no_causal_mask", "CLIPModel's text tower is causal")
    if t.get("proj_bias") or t.get("proj_type", "linear") != "linear":
        _refuse("text_cfg.proj_bias / proj_type", "CLIPModel's text projection is one bias-free linear map")
    pool = t.get("pool_type", "argmax")
    if pool == "argmax":
        hf_eos = 2  # transformers' legacy branch: argmax(input_ids), as open_clip's argmax pooling
    elif pool == "eos":
        hf_eos = int(t.get("eos_id", 2))
        if hf_eos == 2:
            _refuse(
                "text_cfg.pool_type='eos' with eos_id=2",
                "transformers reads eos_token_id=2 as 'pool the largest id' (its legacy argmax), not the first 2",
            )
        if eos_id is not None and eos_id != hf_eos:
            raise ClipHFExportError(
                f"text_cfg.eos_id={hf_eos} but the folder's tokenizer has </s> = {eos_id}: the folder is inconsistent "
                "(re-export it from the CLIP task)"
            )
    else:
        _refuse(f"text_cfg.pool_type={pool!r}", "CLIPModel pools the first eos token (or the largest id)")
    text_width = int(t.get("width", 512))
    heads = int(t.get("heads", 8))
    if text_width % heads:
        _refuse("text_cfg", f"width {text_width} is not a multiple of heads {heads}")
    text = CLIPTextConfig(
        vocab_size=int(t.get("vocab_size", 49408)),
        hidden_size=text_width,
        intermediate_size=int(text_width * float(t.get("mlp_ratio", 4.0))),
        num_hidden_layers=int(t.get("layers", 12)),
        num_attention_heads=heads,
        max_position_embeddings=int(t.get("context_length", 77)),
        hidden_act=act,
        layer_norm_eps=_ln_eps(t, "text_cfg"),
        projection_dim=embed_dim,
        pad_token_id=int(t.get("pad_id", 0)),
        bos_token_id=bos_id,
        eos_token_id=hf_eos,
    )
    scale = float(model_cfg.get("init_logit_scale", math.log(1 / 0.07)))
    return CLIPConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=embed_dim,
        logit_scale_init_value=scale,
    )


# ----------------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------------
def _blocks(prefix: str, resblocks: Any, act: str) -> dict[str, torch.Tensor]:
    """open_clip ``ResidualAttentionBlock`` s -> transformers ``CLIPEncoderLayer`` keys under ``prefix``."""
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock

    out: dict[str, torch.Tensor] = {}
    for i, blk in enumerate(resblocks):
        # the config checks refuse everything else; these catch a module that does not match its config
        assert isinstance(blk, ResidualAttentionBlock), type(blk)
        assert isinstance(blk.ls_1, torch.nn.Identity) and isinstance(blk.ls_2, torch.nn.Identity)
        gelu = blk.mlp.gelu
        want = QuickGELU if act == "quick_gelu" else torch.nn.GELU
        if not isinstance(gelu, want) or getattr(gelu, "approximate", "none") != "none":
            raise ClipHFExportError(f"{prefix}{i}: activation {gelu!r} is not the config's {act}")
        p = f"{prefix}{i}."
        d = blk.attn.embed_dim
        w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias  # [3D, D], [3D]: q, k, v rows stacked
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[p + f"self_attn.{name}.weight"] = w[j * d : (j + 1) * d]
            out[p + f"self_attn.{name}.bias"] = b[j * d : (j + 1) * d]
        pairs = {
            "self_attn.out_proj": blk.attn.out_proj,
            "layer_norm1": blk.ln_1,
            "layer_norm2": blk.ln_2,
            "mlp.fc1": blk.mlp.c_fc,
            "mlp.fc2": blk.mlp.c_proj,
        }
        for name, mod in pairs.items():
            out[p + name + ".weight"], out[p + name + ".bias"] = mod.weight, mod.bias
    return out


def _ln(key: str, mod: Any, eps: float) -> dict[str, torch.Tensor]:
    if abs(mod.eps - eps) > 1e-12:
        raise ClipHFExportError(f"{key}: LayerNorm eps {mod.eps} differs from the config's {eps}")
    return {key + ".weight": mod.weight, key + ".bias": mod.bias}


def open_clip_to_hf(model: Any, config: Any):
    """An open_clip ``CLIP`` (or ``CustomTextCLIP`` with open_clip's text tower) -> a transformers ``CLIPModel``.

    Args:
        model: The open_clip model, its config already accepted by :func:`hf_clip_config`.
        config: The ``CLIPConfig`` from :func:`hf_clip_config`.

    Returns:
        ``CLIPModel`` in eval mode, fp32, every parameter copied (a strict state-dict load).
    """
    from transformers import CLIPModel

    vc, tc = config.vision_config, config.text_config
    vis = model.visual
    # CLIP keeps the text tower's parts on the model itself, CustomTextCLIP in model.text
    txt = getattr(model, "text", model)
    sd: dict[str, torch.Tensor] = {
        "vision_model.embeddings.class_embedding": vis.class_embedding,  # [D]
        "vision_model.embeddings.patch_embedding.weight": vis.conv1.weight,  # [D, 3, p, p], no bias in either
        "vision_model.embeddings.position_embedding.weight": vis.positional_embedding,  # [1 + N, D]
        **_ln("vision_model.pre_layrnorm", vis.ln_pre, vc.layer_norm_eps),
        **_blocks("vision_model.encoder.layers.", vis.transformer.resblocks, vc.hidden_act),
        **_ln("vision_model.post_layernorm", vis.ln_post, vc.layer_norm_eps),
        "visual_projection.weight": vis.proj.T,  # x @ proj [D, E] == Linear with weight proj.T [E, D]
        "text_model.embeddings.token_embedding.weight": txt.token_embedding.weight,  # [V, D]
        "text_model.embeddings.position_embedding.weight": txt.positional_embedding,  # [L, D]
        **_blocks("text_model.encoder.layers.", txt.transformer.resblocks, tc.hidden_act),
        **_ln("text_model.final_layer_norm", txt.ln_final, tc.layer_norm_eps),
        "text_projection.weight": txt.text_projection.T,
        "logit_scale": model.logit_scale.reshape(()),  # [1] when nonscalar_logit_scale (DeepSpeed's flattening)
    }
    hf = CLIPModel(config)
    hf.load_state_dict({k: v.detach().float().contiguous().clone() for k, v in sd.items()}, strict=True)
    return hf.eval()


# ----------------------------------------------------------------------------------------------------------------
# folder -> folder
# ----------------------------------------------------------------------------------------------------------------
def _tokenizer_ids(folder: Path) -> tuple[int | None, int | None]:
    """``(eos_id, bos_id)`` of the folder's ``tokenizer.json`` (``None`` where absent)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None, None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    return tok.token_to_id("</s>"), tok.token_to_id("<s>")


def _save_tokenizer(src: Path, out: Path, context_length: int) -> bool:
    """Write the source's word-level tokenizer as a ``PreTrainedTokenizerFast`` that appends ``</s>``.

    Returns False (nothing written) when the source has no ``tokenizer.json`` or no ``</s>`` / ``<pad>``.
    """
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    path = src / "tokenizer.json"
    if not path.is_file():
        logger.warning("%s has no tokenizer.json: the transformers folder gets no tokenizer", src)
        return False
    tok = Tokenizer.from_file(str(path))
    specials = {name: tok.token_to_id(name) for name in ("<pad>", "<unk>", "<s>", "</s>")}
    if specials["</s>"] is None or specials["<pad>"] is None:
        logger.warning("%s's tokenizer has no </s> or <pad>: the transformers folder gets no tokenizer", src)
        return False
    # the CLIP task encodes "words </s>" and pools the </s>: the post-processor adds it, so a plain call matches
    tok.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[
        ("</s>", specials["</s>"])
    ])  # fmt: skip
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>" if specials["<unk>"] is not None else None,
        bos_token="<s>" if specials["<s>"] is not None else None,
        model_max_length=context_length,
        padding_side="right",
    )
    fast.save_pretrained(str(out))
    return True


def _save_image_processor(out: Path, image_size: int, mean: list[float], std: list[float]) -> None:
    """``preprocessor_config.json``: resize + centre crop to ``image_size``, then ``(x / 255 - mean) / std``."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(mean),
        image_std=list(std),
    )
    proc.save_pretrained(str(out))


@torch.no_grad()
def _self_check(oc: Any, hf: Any, image_size: int, context_length: int, vocab: int, eos: int, seed: int = 0):
    """Max abs differences of unit-norm image and text embeddings on random inputs: ``(image, text)``."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, image_size, image_size, generator=g)
    lengths = torch.randint(1, context_length, (4,), generator=g)
    # random non-eos ids, then the eos, then padding with id 0 (the shape of the task's captions)
    text = torch.randint(0, vocab, (4, context_length), generator=g)
    text[text == eos] = (eos + 1) % vocab
    pos = torch.arange(context_length)
    text[pos[None] > lengths[:, None]] = 0
    text[torch.arange(4), lengths] = eos
    if eos == 2 or hf.config.text_config.eos_token_id == 2:  # argmax pooling: make the eos the largest id
        text[torch.arange(4), lengths] = vocab - 1
    img_oc, txt_oc = oc.encode_image(images, normalize=True), oc.encode_text(text, normalize=True)
    img_hf = torch.nn.functional.normalize(hf.get_image_features(pixel_values=images).pooler_output, dim=-1)
    txt_hf = torch.nn.functional.normalize(hf.get_text_features(input_ids=text).pooler_output, dim=-1)
    return float((img_oc - img_hf).abs().max()), float((txt_oc - txt_hf).abs().max())


def export_clip_hf(src: str | Path, out: str | Path, check_atol: float = 1e-4) -> ClipHFExport:
    """Convert the open_clip folder ``src`` (``mmtok train`` of the clip task, ``export/``) into ``out``.

    Args:
        src: Folder with ``open_clip_config.json`` + ``open_clip_model.safetensors`` (+ ``tokenizer.json``).
        out: Output folder, written atomically (an existing one is replaced once the new one is complete).
        check_atol: Largest allowed difference of the unit-norm embeddings in the self-check (fp32).

    Raises:
        FileNotFoundError: ``src`` is not an open_clip folder with safetensors weights.
        ClipHFExportError: a config transformers' CLIP cannot represent, or the self-check fails.
    """
    import open_clip

    from mmtok.clip.tasks import read_clip_config
    from mmtok.hub import atomic_write_dir

    src = Path(src)
    meta = read_clip_config(src)
    model_cfg, pre = dict(meta.get("model_cfg") or {}), dict(meta.get("preprocess_cfg") or {})
    if not model_cfg:
        raise ClipHFExportError(f"{src / 'open_clip_config.json'} has no model_cfg; it is not an open_clip hub config")
    eos_id, bos_id = _tokenizer_ids(src)
    config = hf_clip_config(model_cfg, eos_id=eos_id, bos_id=bos_id)  # refuses before any weight is read
    # open_clip's own factory reads its folder (patch dropout off: the exported model sees every patch)
    oc = open_clip.create_model(f"local-dir:{src}", force_patch_dropout=0.0).float().eval()
    hf = open_clip_to_hf(oc, config)
    tc = config.text_config
    image_err, text_err = _self_check(
        oc, hf, config.vision_config.image_size, tc.max_position_embeddings, tc.vocab_size, tc.eos_token_id
    )
    if max(image_err, text_err) > check_atol:
        raise ClipHFExportError(
            f"the transformers model differs from open_clip's by {image_err:.2e} (image) / {text_err:.2e} (text) "
            f"on random inputs, more than {check_atol}; this open_clip build is not mapped correctly, please report it"
        )
    if float(hf.logit_scale.detach().exp()) > 100.0:  # the CLIP task caps exp(logit_scale) at 100 in its forward
        logger.warning(
            "exp(logit_scale) = %.1f > 100: the CLIP task trained with the value capped at 100; CLIPModel's "
            "logits use the raw parameter (embeddings and rankings are unaffected)",
            float(hf.logit_scale.detach().exp()),
        )
    mean = [float(x) for x in pre.get("mean", (0.5, 0.5, 0.5))]
    std = [float(x) for x in pre.get("std", (0.5, 0.5, 0.5))]
    wrote_tok = {}

    def write(tmp: Path) -> None:
        hf.save_pretrained(str(tmp), safe_serialization=True)
        hf.vision_model.save_pretrained(str(tmp / "vision_model"), safe_serialization=True)
        for folder in (tmp, tmp / "vision_model"):
            _save_image_processor(folder, config.vision_config.image_size, mean, std)
        wrote_tok["ok"] = _save_tokenizer(src, tmp, tc.max_position_embeddings)
        note = {
            "source": str(src),
            "vision_model": "the image tower alone (CLIPVisionModel), for the MLLM's hf_clip tower",
            "pixels": f"RGB in [0, 1], resized to {config.vision_config.image_size}, then (x - mean) / std",
            "mean": mean,
            "std": std,
            "text_encoding": "tokenizer(captions, padding='max_length', max_length=context_length): words, </s>, "
            "<pad> (the post-processor appends </s>)",
        }
        (tmp / "mmtok_export.json").write_text(json.dumps(note, indent=2))

    atomic_write_dir(out, write)
    logger.info(
        "wrote %s: transformers CLIPModel (max abs diff to open_clip: image %.2e, text %.2e)", out, image_err, text_err
    )
    return ClipHFExport(Path(out), image_err, text_err, wrote_tok.get("ok", False), config, mean, std)

"""Checkpoints from elsewhere into mmtok's MAE family, by state-dict key mapping (never unpickling code).

Three sources are read, all offline from local paths:

* transformers ``ViTMAEForPreTraining`` folders ("Masked Autoencoders Are Scalable Vision Learners", He et al.,
  arXiv:2111.06377; transformers' ``vit_mae``): ``config.json`` + ``*.safetensors`` (+ the optional
  ``preprocessor_config.json`` whose mean/std the model then applies itself). Both key layouts are accepted:
  transformers 5 (``vit.layers.0.attention.q_proj``) and the older one most downloaded folders still use
  (``vit.encoder.layer.0.attention.attention.query``).
* transformers ``VideoMAEForPreTraining`` folders ("VideoMAE: Masked Autoencoders are Data-Efficient Learners for
  Self-Supervised Video Pre-Training", Tong et al., arXiv:2203.12602; transformers' ``videomae``): ``config.json`` +
  ``*.safetensors`` as ``save_pretrained`` writes them (attention biases as ``q_bias``/``v_bias``, or the
  ``query.bias``/``value.bias`` of an in-memory state dict). They become an mmtok MAE with VideoMAE's switches:
  no [CLS] token, the flattened 1-D sinusoid table, no final encoder norm when ``use_mean_pooling``, the source's
  LayerNorm epsilon (the decoder's last norm keeps 1e-5, as there). The missing key bias is a zero bias (softmax
  ignores a per-query constant) and ``encoder_to_decoder`` has no bias (a zero one). ``VideoMAEModel`` folders
  (encoder only) become a ViT encoder.
* The official MAE checkpoint files (facebookresearch/mae ``models_mae.py``): a dict whose ``"model"`` entry maps
  ``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``, ``decoder_embed.weight``... to tensors. They are
  ``.pth`` pickles, so they are read with ``torch.load(weights_only=True)``, which rebuilds tensors and plain
  containers only and refuses any other object. Released *pretrain* files hold the encoder alone: they become a
  ViT encoder folder (kind "mim model", entry "vit"); files with the decoder become a full MAE.

What differs from the sources, on purpose:

* mmtok models take [0, 1] pixels and normalise inside with one scalar mean/std. A per-channel mean/std (ImageNet's)
  is folded into the patch-embedding weights (``W / std_c`` and ``b - sum W * mean_c / std_c``), which is exact for
  the encoder and the predictions; the pixel *targets* of the loss are then [0, 1] pixels rather than
  ImageNet-normalised ones, so the loss (not the features) differs from the source's. Equal per-channel values
  (e.g. 0.5 / 0.5) become mmtok's scalar mean/std and nothing differs. VideoMAE itself un-normalises its input
  with ImageNet's mean/std before building targets, so with ImageNet stats (every released VideoMAE) its targets
  are [0, 1] pixels, exactly mmtok's, and the loss is equal too.
* Position embeddings are fixed sine-cosine tables that mmtok recomputes; the stored ones are compared with
  mmtok's and a mismatch is an error (a model trained with other positions would silently degrade).
* LayerNorm epsilon (transformers uses 1e-12, the official MAE 1e-6, mmtok 1e-5 by default) is carried in the
  model config (``norm_eps``, ``decoder_norm_eps``), so a converted folder reloads with the source's epsilon.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtok.hub import CheckpointError

logger = logging.getLogger(__name__)

__all__ = [
    "ConversionError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "convert_mae_checkpoint",
    "load_hf_videomae",
    "load_hf_vitmae",
    "mask_from_noise",
    "official_mae_to_mmtok",
    "videomae_to_mmtok",
    "vitmae_to_mmtok",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConversionError(CheckpointError):
    """A foreign checkpoint that cannot be mapped onto an mmtok model (the message says why and what to do)."""


# ----------------------------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------------------------
def mask_from_noise(noise: torch.Tensor, mask_ratio: float):
    """The mask transformers' ViTMAE and the official MAE draw from ``noise [B, N]`` (uniform in [0, 1)).

    Tokens with the smallest noise stay visible, in ascending-noise order; ``int(N * (1 - ratio))`` of them.
    Returns a :class:`~mmtok.mim.masking.MaskOutput` to pass to :meth:`MAE.forward`, so the same ``noise`` given to
    ``ViTMAEForPreTraining(pixel_values, noise=noise)`` hides the same tokens in both.
    """
    from mmtok.mim.masking import MaskOutput

    b, n = noise.shape
    k = int(n * (1 - mask_ratio))
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(b, n, dtype=torch.bool, device=noise.device)
    mask[:, :k] = False
    return MaskOutput(mask.gather(1, ids_restore), ids_shuffle[:, :k], ids_restore)


def _fold_normalisation(
    weight: torch.Tensor, bias: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch-embed conv weights ``[D, C, *k]`` that take [0, 1] pixels instead of ``(x - mean_c) / std_c``."""
    shape = (1, -1) + (1,) * (weight.ndim - 2)
    m = torch.tensor(mean, dtype=torch.float64).view(shape)
    s = torch.tensor(std, dtype=torch.float64).view(shape)
    w = weight.double() / s
    b = bias.double() - (w * m).flatten(1).sum(1)
    return w.to(weight.dtype), b.to(bias.dtype)


def _pixel_norm(mean: Any, std: Any, in_chans: int) -> tuple[dict[str, float], tuple | None]:
    """mmtok's scalar ``pixel_mean/pixel_std`` and, when channels differ, the per-channel stats to fold in."""
    mean = tuple(float(v) for v in (mean if isinstance(mean, (list, tuple)) else [mean] * in_chans))
    std = tuple(float(v) for v in (std if isinstance(std, (list, tuple)) else [std] * in_chans))
    if len(mean) != in_chans or len(std) != in_chans:
        raise ConversionError(f"image mean {mean} / std {std} do not have {in_chans} channels")
    if len(set(mean)) == 1 and len(set(std)) == 1:
        return {"pixel_mean": mean[0], "pixel_std": std[0]}, None
    return {"pixel_mean": 0.0, "pixel_std": 1.0}, (mean, std)


def _check_positions(stored: torch.Tensor | None, model: nn.Module, where: str) -> None:
    """A stored position table must be the fixed sine-cosine one mmtok recomputes (cls row included)."""
    if stored is None:
        return
    enc = getattr(model, "encoder", model)
    want = enc.pos_embed
    if tuple(stored.shape) != tuple(want.shape):
        raise ConversionError(
            f"{where}: position table {tuple(stored.shape)} does not fit the grid {tuple(want.shape)}"
        )
    diff = (stored.float() - want.float()).abs().max().item()
    if diff > 1e-4:
        raise ConversionError(
            f"{where}: the stored position embeddings are not MAE's fixed 2D sine-cosine table (max difference "
            f"{diff:.2g}); mmtok recomputes that table, so this checkpoint cannot be converted faithfully"
        )


def _build(config: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """Create the registered model and load the mapped state strictly (names the first mismatch)."""
    from mmtok import hub, registries

    name = "mae" if any(k.startswith("decoder_") for k in state) else "vit"
    model = registries.get("mim model").create(name, **config)
    model.hub_name = name
    hub.load_state_dict_checked(model, state, where=where)
    return model.eval()


def _blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    ids = {int(m.group(1)) for k in state if (m := pat.match(k))}
    if ids and ids != set(range(len(ids))):
        raise ConversionError(f"blocks under {prefix!r} are not numbered 0..{len(ids) - 1}: {sorted(ids)}")
    return len(ids)


# ----------------------------------------------------------------------------------------------------------------
# transformers ViTMAE
# ----------------------------------------------------------------------------------------------------------------
# old transformers names -> the transformers 5 names (one canonical layout to map from)
_HF_OLD = [
    (r"^vit\.encoder\.layer\.", "vit.layers."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
]


def _hf_canonical(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for pat, rep in _HF_OLD:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


def _hf_decoder_shape(
    state: dict[str, torch.Tensor], c: dict[str, Any], ratio: float, where: str, width: int, heads: int
) -> tuple[int, int, int]:
    """Width, heads and depth of a transformers (Video)MAE decoder (``width`` / ``heads``: the family's defaults).

    mmtok's MAE has one ``mlp_ratio`` for encoder and decoder, so a decoder with another ratio is refused.
    """
    dw, dh = int(c.get("decoder_hidden_size", width)), int(c.get("decoder_num_attention_heads", heads))
    d_ratio = int(c.get("decoder_intermediate_size", 4 * dw)) / dw
    if abs(d_ratio - ratio) > 1e-9:
        raise ConversionError(
            f"{where}: decoder MLP ratio {d_ratio} differs from the encoder's {ratio}; mmtok's MAE uses one "
            "mlp_ratio for both"
        )
    return dw, dh, _blocks(state, "decoder.decoder_layers.")


def _hf_block(state: dict[str, torch.Tensor], src: str, dst: str, width: int) -> dict[str, torch.Tensor]:
    """One transformers ViT layer -> a timm ``Block`` (q, k, v stacked into ``qkv``)."""
    g = lambda name: state[f"{src}.{name}"]  # noqa: E731
    zeros = torch.zeros(width, dtype=g("attention.q_proj.weight").dtype)
    bias = [state.get(f"{src}.attention.{p}.bias", zeros) for p in ("q_proj", "k_proj", "v_proj")]
    return {
        f"{dst}.norm1.weight": g("layernorm_before.weight"),
        f"{dst}.norm1.bias": g("layernorm_before.bias"),
        f"{dst}.attn.qkv.weight": torch.cat([g(f"attention.{p}.weight") for p in ("q_proj", "k_proj", "v_proj")]),
        f"{dst}.attn.qkv.bias": torch.cat(bias),
        f"{dst}.attn.proj.weight": g("attention.o_proj.weight"),
        f"{dst}.attn.proj.bias": g("attention.o_proj.bias"),
        f"{dst}.norm2.weight": g("layernorm_after.weight"),
        f"{dst}.norm2.bias": g("layernorm_after.bias"),
        f"{dst}.mlp.fc1.weight": g("mlp.fc1.weight"),
        f"{dst}.mlp.fc1.bias": g("mlp.fc1.bias"),
        f"{dst}.mlp.fc2.weight": g("mlp.fc2.weight"),
        f"{dst}.mlp.fc2.bias": g("mlp.fc2.bias"),
    }


def _missing_key_is_conversion_error(fn):
    """A tensor the mapping needs but the checkpoint lacks becomes a :class:`ConversionError` naming it."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except KeyError as e:
            where = kwargs.get("where", "checkpoint")
            raise ConversionError(f"{where}: tensor {e} is missing; is this the right kind of checkpoint?") from e

    return wrapper


@_missing_key_is_conversion_error
def vitmae_to_mmtok(
    hf_config: dict[str, Any],
    state: dict[str, torch.Tensor],
    mean: Any = IMAGENET_MEAN,
    std: Any = IMAGENET_STD,
    where: str = "ViTMAE checkpoint",
) -> nn.Module:
    """A transformers ViTMAE config dict + state dict -> mmtok :class:`~mmtok.mim.mae.MAE` (eval mode).

    Args:
        hf_config: ``config.json`` of a ``vit_mae`` model.
        state: Its tensors (``ViTMAEForPreTraining``: ``vit.*`` and ``decoder.*``; ``ViTMAEModel``: no prefix or
            ``vit.``, encoder only -> an mmtok ViT encoder).
        mean, std: The image processor's normalisation (per channel or scalar), applied inside the mmtok model.

    Raises:
        ConversionError: shapes or options mmtok's MAE cannot express (named in the message).
    """
    c = hf_config
    if c.get("model_type") not in (None, "vit_mae"):
        raise ConversionError(f"{where}: model_type {c.get('model_type')!r} is not vit_mae")
    sd = _hf_canonical(state)
    if not any(k.startswith("vit.") for k in sd):  # ViTMAEModel saved alone
        sd = {f"vit.{k}": v for k, v in sd.items()}
    width, heads = int(c.get("hidden_size", 768)), int(c.get("num_attention_heads", 12))
    ratio = int(c.get("intermediate_size", 4 * width)) / width
    in_chans = int(c.get("num_channels", 3))
    if c.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"{where}: hidden_act {c.get('hidden_act')!r} is not supported (mmtok's blocks use GELU)")
    norm, fold = _pixel_norm(mean, std, in_chans)
    depth = _blocks(sd, "vit.layers.")
    config: dict[str, Any] = {
        "img_size": int(c.get("image_size", 224)),
        "patch_size": int(c.get("patch_size", 16)),
        "in_chans": in_chans,
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": ratio,
        "qkv_bias": bool(c.get("qkv_bias", True)),
        "norm_eps": float(c.get("layer_norm_eps", 1e-12)),  # decoder norms too: transformers' ViTMAE uses one eps
        **norm,
    }
    w = sd["vit.embeddings.patch_embeddings.projection.weight"]
    b = sd["vit.embeddings.patch_embeddings.projection.bias"]
    if fold:
        w, b = _fold_normalisation(w, b, *fold)
    out = {
        "encoder.cls_token": sd["vit.embeddings.cls_token"],
        "encoder.patch_embed.proj.weight": w,
        "encoder.patch_embed.proj.bias": b,
        "encoder.norm.weight": sd["vit.layernorm.weight"],
        "encoder.norm.bias": sd["vit.layernorm.bias"],
    }
    for i in range(depth):
        out.update(_hf_block(sd, f"vit.layers.{i}", f"encoder.blocks.{i}", width))
    has_decoder = "decoder.decoder_embed.weight" in sd
    if has_decoder:
        dw, dh, d_depth = _hf_decoder_shape(sd, c, ratio, where, width=512, heads=16)
        config.update(
            decoder_dim=dw, decoder_depth=d_depth, decoder_heads=dh, norm_pix_loss=bool(c.get("norm_pix_loss", False))
        )
        out.update(
            {
                "mask_token": sd["decoder.mask_token"],
                "decoder_embed.weight": sd["decoder.decoder_embed.weight"],
                "decoder_embed.bias": sd["decoder.decoder_embed.bias"],
                "decoder_norm.weight": sd["decoder.decoder_norm.weight"],
                "decoder_norm.bias": sd["decoder.decoder_norm.bias"],
                "decoder_pred.weight": sd["decoder.decoder_pred.weight"],
                "decoder_pred.bias": sd["decoder.decoder_pred.bias"],
            }
        )
        for i in range(d_depth):
            out.update(_hf_block(sd, f"decoder.decoder_layers.{i}", f"decoder_blocks.{i}", dw))
        # transformers' decoder blocks follow config.qkv_bias; mmtok's always have biases (zeros are the same)
    if not has_decoder:
        out = {k[len("encoder.") :]: v for k, v in out.items()}
    model = _build(config, out, where)
    _check_positions(sd.get("vit.embeddings.position_embeddings"), model, where)
    if has_decoder:
        stored = sd.get("decoder.decoder_pos_embed")
        if stored is not None and (stored.float() - model.decoder_pos_embed.float()).abs().max() > 1e-4:
            raise ConversionError(f"{where}: the decoder's position table is not MAE's fixed sine-cosine table")
    return model


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def _read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise ConversionError(
            f"{folder} has no .safetensors weights ({', '.join(found) or 'no weight files'}); mmtok never unpickles "
            "weights. Convert the folder once, where you trust it: load it with transformers and call "
            "save_pretrained(new_folder) (transformers writes safetensors)"
        )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f"{f} is not a readable safetensors file ({e})") from e
    return state


def load_hf_vitmae(folder: str | Path) -> nn.Module:
    """A local transformers ``ViTMAEForPreTraining`` / ``ViTMAEModel`` folder -> mmtok MAE (or ViT encoder).

    Reads ``config.json``, the ``*.safetensors`` weights and, when present, ``preprocessor_config.json``
    (``image_mean``/``image_std``; ImageNet's otherwise, as transformers' ViTMAE processors use).

    Example:
        >>> mae = load_hf_vitmae("checkpoints/vit-mae-base")       # doctest: +SKIP
        >>> out = mae(images, mask_from_noise(torch.rand(len(images), mae.num_patches), 0.75))  # doctest: +SKIP
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder} has no config.json: pass a transformers ViTMAE folder")
    cfg = _read_json(folder / "config.json")
    if cfg.get("model_type") == "videomae":
        raise ConversionError(
            f"{folder} is a VideoMAE folder, not ViTMAE: load it with mmtok.mim.convert.load_hf_videomae or convert "
            f"it with `mmtok convert videomae --input {folder} --out OUT`"
        )
    if cfg.get("model_type") != "vit_mae":
        raise ConversionError(f"{folder}: model_type {cfg.get('model_type')!r} is not vit_mae")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        p = _read_json(pre)
        mean, std = p.get("image_mean", mean), p.get("image_std", std)
    else:
        logger.info("%s has no preprocessor_config.json: assuming ImageNet mean/std", folder)
    return vitmae_to_mmtok(cfg, _read_safetensors_folder(folder), mean, std, where=str(folder))


# ----------------------------------------------------------------------------------------------------------------
# transformers VideoMAE
# ----------------------------------------------------------------------------------------------------------------
# save_pretrained writes VideoMAE's separate q/v bias parameters; an in-memory transformers 5 model names them
# query.bias / value.bias. One canonical layout (the latter) is mapped from.
_VIDEOMAE_BIAS = [
    (r"\.attention\.attention\.q_bias$", ".attention.attention.query.bias"),
    (r"\.attention\.attention\.v_bias$", ".attention.attention.value.bias"),
]
# heads of VideoMAEForVideoClassification: not part of the pretraining model, left out with a log line
_VIDEOMAE_HEADS = ("fc_norm.", "classifier.")


def _videomae_block(state: dict[str, torch.Tensor], src: str, dst: str, width: int) -> dict[str, torch.Tensor]:
    """One transformers VideoMAE layer -> a timm ``Block``: q, k, v stacked into ``qkv`` with a zero key bias."""
    g = lambda name: state[f"{src}.{name}"]  # noqa: E731
    att = "attention.attention"
    zeros = torch.zeros(width, dtype=g(f"{att}.query.weight").dtype)
    # a missing q/v bias (qv_bias=False) is zero too; the model is then built with qkv_bias=False and drops them
    bias = [state.get(f"{src}.{att}.query.bias", zeros), zeros, state.get(f"{src}.{att}.value.bias", zeros)]
    return {
        f"{dst}.norm1.weight": g("layernorm_before.weight"),
        f"{dst}.norm1.bias": g("layernorm_before.bias"),
        f"{dst}.attn.qkv.weight": torch.cat([g(f"{att}.{p}.weight") for p in ("query", "key", "value")]),
        f"{dst}.attn.qkv.bias": torch.cat(bias),
        f"{dst}.attn.proj.weight": g("attention.output.dense.weight"),
        f"{dst}.attn.proj.bias": g("attention.output.dense.bias"),
        f"{dst}.norm2.weight": g("layernorm_after.weight"),
        f"{dst}.norm2.bias": g("layernorm_after.bias"),
        f"{dst}.mlp.fc1.weight": g("intermediate.dense.weight"),
        f"{dst}.mlp.fc1.bias": g("intermediate.dense.bias"),
        f"{dst}.mlp.fc2.weight": g("output.dense.weight"),
        f"{dst}.mlp.fc2.bias": g("output.dense.bias"),
    }


def _square(value: Any, what: str, where: str) -> int:
    """transformers allows ``(h, w)`` sizes; mmtok's patch embed is square."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"{where}: {what} {list(value)} is not square; mmtok's ViT takes square inputs")
        value = value[0]
    return int(value)


@_missing_key_is_conversion_error
def videomae_to_mmtok(
    hf_config: dict[str, Any],
    state: dict[str, torch.Tensor],
    mean: Any = IMAGENET_MEAN,
    std: Any = IMAGENET_STD,
    where: str = "VideoMAE checkpoint",
) -> nn.Module:
    """A transformers VideoMAE config dict + state dict -> mmtok :class:`~mmtok.mim.mae.MAE` (eval mode).

    The result takes clips ``[B, C, T, H, W]`` in [0, 1] (transformers' ``pixel_values`` are ``[B, T, C, H, W]``,
    normalised by the processor). Given the same boolean mask (:func:`~mmtok.mim.masking.mask_to_output`), its
    ``latent`` equals ``VideoMAEModel``'s ``last_hidden_state`` (visible tokens in raster order), its ``pred`` at
    the hidden tokens equals ``VideoMAEForPreTraining``'s ``logits`` and its ``loss`` the ``loss``.

    Args:
        hf_config: ``config.json`` of a ``videomae`` model.
        state: Its tensors (``VideoMAEForPreTraining``: ``videomae.*``, ``encoder_to_decoder.*``, ``decoder.*``,
            ``mask_token``; ``VideoMAEModel``: no prefix, encoder only -> an mmtok ViT encoder).
        mean, std: The processor's normalisation (per channel or scalar), applied inside the mmtok model.

    Raises:
        ConversionError: shapes or options mmtok's MAE cannot express (named in the message).
    """
    c = hf_config
    if c.get("model_type") not in (None, "videomae"):
        raise ConversionError(f"{where}: model_type {c.get('model_type')!r} is not videomae")
    sd = {}
    for k, v in state.items():
        for pat, rep in _VIDEOMAE_BIAS:
            k = re.sub(pat, rep, k)
        sd[k] = v
    heads = sorted(k for k in sd if k.startswith(_VIDEOMAE_HEADS))
    if heads:
        logger.info("%s: leaving out the classification head (%s): mmtok converts the encoder", where, heads[0])
        sd = {k: v for k, v in sd.items() if k not in heads}
    if not any(k.startswith("videomae.") for k in sd):  # VideoMAEModel saved alone
        sd = {
            k if k.startswith(("decoder.", "encoder_to_decoder.", "mask_token")) else f"videomae.{k}": v
            for k, v in sd.items()
        }
    if c.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"{where}: hidden_act {c.get('hidden_act')!r} is not supported (mmtok's blocks use GELU)")
    width, heads_n = int(c.get("hidden_size", 768)), int(c.get("num_attention_heads", 12))
    ratio = int(c.get("intermediate_size", 4 * width)) / width
    in_chans = int(c.get("num_channels", 3))
    norm, fold = _pixel_norm(mean, std, in_chans)
    if in_chans == 3 and not c.get("norm_pix_loss", True) and fold != (IMAGENET_MEAN, IMAGENET_STD):
        # raw-pixel targets only: normalised targets are the same up to the 1e-6 in the denominator
        logger.warning(
            "%s: transformers' VideoMAE un-normalises its targets with ImageNet's mean/std whatever the processor "
            "used; with mean %s / std %s its raw-pixel loss targets differ from mmtok's [0, 1] ones",
            where,
            mean,
            std,
        )
    depth = _blocks(sd, "videomae.encoder.layer.")
    if depth == 0:
        raise ConversionError(f"{where}: no videomae.encoder.layer.N.* tensors; is this a VideoMAE checkpoint?")
    use_mean_pooling = bool(c.get("use_mean_pooling", True))
    config: dict[str, Any] = {
        "img_size": _square(c.get("image_size", 224), "image_size", where),
        "patch_size": _square(c.get("patch_size", 16), "patch_size", where),
        "in_chans": in_chans,
        "num_frames": int(c.get("num_frames", 16)),
        "tubelet_size": int(c.get("tubelet_size", 2)),
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads_n,
        "mlp_ratio": ratio,
        # transformers 4 configs call it qkv_bias, transformers 5 qv_bias: query and value biases either way
        "qkv_bias": bool(c.get("qv_bias", c.get("qkv_bias", True))),
        "cls_token": False,
        "pos_embed_type": "flat",
        "final_norm": not use_mean_pooling,
        "norm_eps": float(c.get("layer_norm_eps", 1e-12)),
        **norm,
    }
    w = sd["videomae.embeddings.patch_embeddings.projection.weight"]
    b = sd["videomae.embeddings.patch_embeddings.projection.bias"]
    if w.ndim != 5:
        raise ConversionError(f"{where}: the patch projection {tuple(w.shape)} is not a 3D tubelet convolution")
    if fold:
        w, b = _fold_normalisation(w, b, *fold)
    out = {"encoder.patch_embed.proj.weight": w, "encoder.patch_embed.proj.bias": b}
    if not use_mean_pooling:
        out["encoder.norm.weight"], out["encoder.norm.bias"] = (
            sd["videomae.layernorm.weight"],
            sd["videomae.layernorm.bias"],
        )
    for i in range(depth):
        out.update(_videomae_block(sd, f"videomae.encoder.layer.{i}", f"encoder.blocks.{i}", width))
    has_decoder = "decoder.head.weight" in sd
    if has_decoder:
        dw, dh, d_depth = _hf_decoder_shape(sd, c, ratio, where, width=384, heads=6)
        config.update(
            decoder_dim=dw,
            decoder_depth=d_depth,
            decoder_heads=dh,
            norm_pix_loss=bool(c.get("norm_pix_loss", True)),
            decoder_norm_eps=1e-5,  # transformers builds the decoder's last LayerNorm with the default epsilon
        )
        proj = sd["encoder_to_decoder.weight"]
        out.update(
            {
                "mask_token": sd["mask_token"],
                "decoder_embed.weight": proj,
                "decoder_embed.bias": sd.get("encoder_to_decoder.bias", torch.zeros(dw, dtype=proj.dtype)),
                "decoder_norm.weight": sd["decoder.norm.weight"],
                "decoder_norm.bias": sd["decoder.norm.bias"],
                "decoder_pred.weight": sd["decoder.head.weight"],
                "decoder_pred.bias": sd["decoder.head.bias"],
            }
        )
        for i in range(d_depth):
            out.update(_videomae_block(sd, f"decoder.decoder_layers.{i}", f"decoder_blocks.{i}", dw))
        # mmtok's decoder blocks always have q/k/v biases; with qv_bias=False transformers' have none (zeros)
    else:
        out = {k[len("encoder.") :]: v for k, v in out.items()}
    if not config["qkv_bias"]:  # mmtok's encoder then has no qkv bias at all: drop the zero ones
        out = {k: v for k, v in out.items() if not (k.endswith("attn.qkv.bias") and not k.startswith("decoder_"))}
    return _build(config, out, where)


def load_hf_videomae(folder: str | Path) -> nn.Module:
    """A local transformers ``VideoMAEForPreTraining`` / ``VideoMAEModel`` folder -> mmtok MAE (or ViT encoder).

    Reads ``config.json``, the ``*.safetensors`` weights and, when present, the processor's mean/std
    (``preprocessor_config.json`` or ``video_preprocessor_config.json``; ImageNet's otherwise, as every released
    VideoMAE uses).

    Example:
        >>> mae = load_hf_videomae("checkpoints/videomae-base")      # doctest: +SKIP
        >>> out = mae(clips, mask_to_output(bool_masked_pos))      # clips [B, C, T, H, W] in [0, 1]  # doctest: +SKIP
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder} has no config.json: pass a transformers VideoMAE folder")
    cfg = _read_json(folder / "config.json")
    if cfg.get("model_type") == "vit_mae":
        raise ConversionError(
            f"{folder} is a ViTMAE folder, not VideoMAE: convert it with `mmtok convert vitmae --input {folder} "
            "--out OUT`"
        )
    if cfg.get("model_type") != "videomae":
        raise ConversionError(f"{folder}: model_type {cfg.get('model_type')!r} is not videomae")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        if (folder / name).is_file():
            p = _read_json(folder / name)
            mean, std = p.get("image_mean", mean), p.get("image_std", std)
            break
    else:
        logger.info("%s has no preprocessor_config.json: assuming ImageNet mean/std", folder)
    return videomae_to_mmtok(cfg, _read_safetensors_folder(folder), mean, std, where=str(folder))


# ----------------------------------------------------------------------------------------------------------------
# official MAE checkpoints (facebookresearch/mae)
# ----------------------------------------------------------------------------------------------------------------
_OFFICIAL_SKIP = ("pos_embed", "decoder_pos_embed", "fc_norm.", "head.")


@_missing_key_is_conversion_error
def official_mae_to_mmtok(
    state: dict[str, torch.Tensor],
    num_heads: int = 0,
    decoder_heads: int = 0,
    mean: Any = IMAGENET_MEAN,
    std: Any = IMAGENET_STD,
    norm_pix_loss: bool = True,
    where: str = "MAE checkpoint",
) -> nn.Module:
    """An official MAE state dict (``models_mae.py`` names) -> mmtok MAE (with decoder) or ViT encoder.

    Shapes give everything but the head counts: ``num_heads`` defaults to ``width // 64`` and ``decoder_heads`` to
    ``decoder_width // 32`` (ViT-B/L/H and MAE's 512-wide, 16-head decoder). ``norm_pix_loss``: the released
    pretrain weights used per-patch normalised targets; the "visualize" ones did not.
    """
    sd = {k.removeprefix("module."): v for k, v in state.items()}
    needed = ("cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ConversionError(f"{where}: not an MAE state dict (missing {missing}); keys start {sorted(sd)[:5]}")
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise ConversionError(f"{where}: patch_embed.proj.weight {tuple(w.shape)} is not a square 2D patch conv")
    width, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    depth = _blocks(sd, "blocks.")
    if depth == 0:
        raise ConversionError(f"{where}: no blocks.N.* keys")
    pos = sd.get("pos_embed")
    if pos is None:
        raise ConversionError(f"{where}: no pos_embed, so the image size is unknown")
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    if grid * grid != pos.shape[1] - 1:
        raise ConversionError(f"{where}: pos_embed has {pos.shape[1] - 1} patch rows, not a square grid")
    heads = num_heads or max(1, width // 64)
    norm, fold = _pixel_norm(mean, std, in_chans)
    config: dict[str, Any] = {
        "img_size": grid * patch,
        "patch_size": patch,
        "in_chans": in_chans,
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / width,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "norm_eps": 1e-6,  # models_mae.py builds every LayerNorm with eps=1e-6
        **norm,
    }
    b = sd["patch_embed.proj.bias"]
    if fold:
        w, b = _fold_normalisation(w, b, *fold)
    has_decoder = "decoder_embed.weight" in sd
    out: dict[str, torch.Tensor] = {}
    prefix = "encoder." if has_decoder else ""
    for k, v in sd.items():
        if k.startswith(_OFFICIAL_SKIP) or k in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
            continue
        if k.startswith(("decoder_", "mask_token")):
            out[k] = v
        else:
            out[prefix + k] = v
    out[prefix + "patch_embed.proj.weight"], out[prefix + "patch_embed.proj.bias"] = w, b
    if has_decoder:
        dw = int(sd["decoder_embed.weight"].shape[0])
        d_ratio = sd["decoder_blocks.0.mlp.fc1.weight"].shape[0] / dw
        if abs(d_ratio - config["mlp_ratio"]) > 1e-9:
            raise ConversionError(f"{where}: decoder MLP ratio {d_ratio} differs from the encoder's")
        config.update(
            decoder_dim=dw,
            decoder_depth=_blocks(sd, "decoder_blocks."),
            decoder_heads=decoder_heads or max(1, dw // 32),
            norm_pix_loss=norm_pix_loss,
        )
    if not config["qkv_bias"]:
        raise ConversionError(f"{where}: blocks without qkv bias are not supported")
    model = _build(config, out, where)
    _check_positions(pos, model, where)
    return model


def convert_mae_checkpoint(src: str | Path, out: str | Path, **kwargs: Any) -> tuple[nn.Module, Path]:
    """Read an official MAE ``.pth`` (``torch.load(weights_only=True)``) and write an mmtok folder (safetensors).

    Args:
        src: The checkpoint file (a dict with a ``"model"`` entry, or the state dict itself).
        out: Output folder (config.json + model.safetensors); load it with ``hub.from_pretrained(out)``, as a
            ``mmtok_vit`` tower (``{"name": "mmtok_vit", "path": out}``) or with :func:`mmtok.api.load_encoder`.
        kwargs: :func:`official_mae_to_mmtok` options (``num_heads``, ``decoder_heads``, ``norm_pix_loss``, ...).
    """
    src = Path(src)
    if not src.is_file():
        raise ConversionError(f"{src} does not exist")
    if src.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(src))
    else:
        try:
            # training checkpoints of the MAE repository also store their argparse Namespace: plain data
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(str(src), map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses code objects; a damaged file fails to unzip
            raise ConversionError(
                f"{src} could not be read as tensors only ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                "mmtok reads checkpoints with torch.load(weights_only=True) and never runs pickled code"
            ) from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{src}: expected a dict of tensors (or one under 'model')")
    model = official_mae_to_mmtok(obj, where=str(src), **kwargs)
    return model, model.save_pretrained(out)

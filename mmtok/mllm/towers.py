"""Vision towers of the MLLM: one small interface over mmtok's ViT, timm ViTs, open_clip and HF CLIP/SigLIP.

LLaVA (Liu et al., "Improved Baselines with Visual Instruction Tuning", arXiv:2310.03744; reference code
haotian-liu/LLaVA and transformers' ``llava``) feeds the LLM with the patch features of one encoder layer
(the penultimate CLIP layer, [CLS] dropped). Every tower here exposes:

* ``hidden_states(pixel_values) -> list[Tensor]`` with index 0 = embeddings and ``i`` = output of block ``i``
  (the ``output_hidden_states`` convention of transformers), each ``[B, P + N, D]`` with ``P`` prefix tokens
  ([CLS]) first;
* ``layer_qk(block, hidden_in) -> (q, k)``: the block's queries (already multiplied by the softmax scale) and
  keys ``[B, H, T, dh]`` recomputed from the block's input. Pruners use it to get one attention row per head
  (FasterVLM's [CLS] row) without turning off SDPA in the tower: the tower itself always runs fused attention.

Which tokens of the feature layer reach the LLM (:func:`select_features`, :func:`num_feature_tokens`):
``"patch"`` drops the tower's own prefix tokens ([CLS]; none for SigLIP); ``"default"`` is transformers' LLaVA
``vision_feature_select_strategy="default"``, which drops index 0 whatever it is, so on a SigLIP tower (no [CLS])
it drops a real patch (24 of 25 features), as a checkpoint trained with transformers expects; a warning says
so. ``"cls_patch"`` / ``"full"`` keep every token.

Weights come from local paths only (``path``/``checkpoint``); nothing is downloaded and nothing is unpickled:
checkpoints must be ``.safetensors`` files (:func:`load_local_state_dict`), and transformers folders are read
with ``use_safetensors=True``. Towers lay image tokens on a square grid, so non-square image or patch sizes are
refused when the tower is built.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mmtok.registries import VISION_TOWERS

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TowerError(ValueError):
    """A vision tower that cannot be built from its config."""


CONVERT_HINT = (
    "mmtok never unpickles weights (a pickle can run code). Convert the file once, where you trust it, with "
    'python -c "import torch; from safetensors.torch import save_file; '
    "sd = torch.load('{src}', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
    "save_file({{k: v.contiguous() for k, v in sd.items()}}, '{dst}')\" and point the config at {dst}"
)


def load_local_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a local ``.safetensors`` file; any other format is refused (never unpickled).

    Raises:
        TowerError: the file is missing, is not a ``.safetensors`` file (with the command that converts it), or
            is not a valid safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise TowerError(f"checkpoint {path} does not exist; weights load from local files only")
    if path.suffix != ".safetensors":
        dst = path.with_suffix(".safetensors")
        raise TowerError(f"checkpoint {path} is not a .safetensors file. " + CONVERT_HINT.format(src=path, dst=dst))
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise TowerError(f"checkpoint {path} is not a readable safetensors file ({e})") from e


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object, or :class:`TowerError` naming the file."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TowerError(f"{path} cannot be read as JSON ({e})") from e
    if not isinstance(data, dict):
        raise TowerError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def _folder_weights(folder: Path, names: tuple[str, ...]) -> Path:
    """The first of ``names`` (safetensors files) present in ``folder``; pickled ones are refused with the fix."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        src = folder / pickled[0]
        raise TowerError(
            f"{folder} holds {', '.join(pickled)} but no {names[0]}. "
            + CONVERT_HINT.format(src=src, dst=folder / names[0])
        )
    raise TowerError(f"{folder} has none of {', '.join(names)}")


def _square(value: Any, what: str, name: str) -> int:
    """``value`` (an int or an ``(h, w)`` pair) as one side length; a non-square pair is refused."""
    if isinstance(value, (tuple, list)):
        if len(set(int(v) for v in value)) != 1:
            raise TowerError(
                f"{name}: {what} {tuple(value)} is not square. mmtok's towers resize images to a square and lay the "
                f"image tokens on a square grid (pruners and seg heads rely on it); use a square {what}, e.g. "
                f"{what}={int(value[0])}"
            )
        value = value[0]
    return int(value)


FEATURE_SELECT = ("patch", "default", "cls_patch", "full")


def feature_tokens_dropped(tower: VisionTower, select: str) -> int:
    """Leading tokens of the feature layer that do not reach the LLM under feature strategy ``select``.

    Args:
        tower: The vision tower.
        select: ``"patch"`` (drop the tower's prefix tokens: [CLS], none for SigLIP), ``"default"``
            (transformers' LLaVA: drop index 0 whatever it is), ``"cls_patch"`` / ``"full"`` (drop nothing).
    """
    if select == "patch":
        return tower.num_prefix_tokens
    if select == "default":
        if tower.num_prefix_tokens == 0 and not getattr(tower, "_warned_default", False):
            tower._warned_default = True  # once per tower
            logger.warning(
                "%s has no [CLS] token, yet LLaVA's 'default' feature strategy drops token 0, as transformers does: "
                "the LLM sees %d of %d patches (the top-left one is lost). Kept for parity with checkpoints trained "
                "that way; use feature_select='patch' for a new model",
                type(tower).__name__,
                tower.num_patches - 1,
                tower.num_patches,
            )
        return 1
    if select in ("cls_patch", "full"):
        return 0
    raise TowerError(f"feature strategy must be one of {FEATURE_SELECT}, not {select!r}")


def num_feature_tokens(tower: VisionTower, select: str) -> int:
    """Image tokens per image the LLM sees under feature strategy ``select`` (see :func:`feature_tokens_dropped`)."""
    return tower.num_patches + tower.num_prefix_tokens - feature_tokens_dropped(tower, select)


def select_features(tower: VisionTower, hidden: torch.Tensor, select: str) -> torch.Tensor:
    """The feature-layer tokens that reach the LLM: ``[B, P + N, D] -> [B, num_feature_tokens, D]``."""
    return hidden[:, feature_tokens_dropped(tower, select) :]


class VisionTower(nn.Module):
    """Base class: normalisation + hidden states + per-block q/k for attention rows.

    Subclasses set ``num_layers``, ``hidden_size``, ``num_prefix_tokens``, ``image_size``, ``patch_size`` and
    implement :meth:`hidden_states` and :meth:`layer_qk`.
    """

    num_layers: int
    hidden_size: int
    num_prefix_tokens: int
    image_size: int
    patch_size: int

    def _set_norm(self, mean: list[float] | tuple[float, ...], std: list[float] | tuple[float, ...]) -> None:
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` in [0, 1] -> normalised pixels at the tower's resolution."""
        if images.ndim != 4:
            raise ValueError(f"images must be [B, C, H, W] in [0, 1], got shape {tuple(images.shape)}")
        if images.shape[1] == 1:  # grayscale sources (Fashion-MNIST) go to every channel
            images = images.expand(-1, 3, -1, -1)
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return (images - self.pixel_mean.to(images)) / self.pixel_std.to(images)

    def hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def layer_qk(self, block: int, hidden_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    return rearrange(x, "b t (h d) -> b h t d", h=num_heads)


# --------------------------------------------------------------------------------------------------------------
# transformers CLIP / SigLIP
# --------------------------------------------------------------------------------------------------------------
@dataclass
class HFVisionTowerConfig:
    """A transformers vision model (``clip_vision_model`` or ``siglip_vision_model``)."""

    path: str = ""  # local folder with config.json + weights ("" = random init from `config`)
    model_type: str = "clip_vision_model"  # clip_vision_model | siglip_vision_model
    config: dict[str, Any] = field(default_factory=dict)  # fields of the HF vision config
    mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    std: list[float] = field(default_factory=lambda: list(CLIP_STD))


_HF_VISION_CLASSES = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}


class HFVisionTower(VisionTower):
    """``CLIPVisionModel`` / ``SiglipVisionModel`` from transformers (SDPA attention).

    ``path`` may hold the vision model alone or a whole ``CLIPModel`` / ``SiglipModel`` (its vision half is loaded);
    a ``preprocessor_config.json`` beside the weights gives ``image_mean`` / ``image_std`` (``mean``/``std`` of the
    config apply to folders without one).
    """

    def __init__(self, config: HFVisionTowerConfig, model: nn.Module | None = None):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.config = config
        if model is None:
            if config.path:
                folder = Path(config.path)
                if folder.is_dir() and not any(folder.glob("*.safetensors")):
                    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
                    raise TowerError(
                        f"{folder} has no .safetensors weights ({', '.join(found) or 'no weight files'}); mmtok never "
                        "unpickles weights. Convert the folder once, where you trust it: load it with transformers "
                        "and call save_pretrained(new_folder) (transformers writes safetensors)"
                    )
                meta = _json_object(folder / "config.json") if (folder / "config.json").is_file() else {}
                # a whole CLIPModel / SiglipModel folder (e.g. `mmtok convert clip-hf`): load its vision half
                cls = _HF_VISION_CLASSES.get(str(meta.get("model_type", "")))
                if cls is not None:
                    import transformers

                    loader = getattr(transformers, cls)
                else:
                    loader = AutoModel
                model = loader.from_pretrained(config.path, local_files_only=True, use_safetensors=True)
                pre = folder / "preprocessor_config.json"
                if pre.is_file():  # the normalisation the weights were trained with, as a timm folder's pretrained_cfg
                    proc = _json_object(pre)
                    if "image_mean" in proc and "image_std" in proc:
                        config.mean = [float(v) for v in proc["image_mean"]]
                        config.std = [float(v) for v in proc["image_std"]]
            else:
                hf_cfg = AutoConfig.for_model(config.model_type, **config.config)
                model = AutoModel.from_config(hf_cfg)
        self.model = model
        cfg = model.config
        # resolved config, so a saved MLLM rebuilds the tower without the original folder
        self.config.model_type, self.config.config, self.config.path = cfg.model_type, _hf_dict(cfg), ""
        self.num_layers = cfg.num_hidden_layers
        self.hidden_size = cfg.hidden_size
        name = cfg.model_type
        self.image_size = _square(cfg.image_size, "image_size", name)
        self.patch_size = _square(cfg.patch_size, "patch_size", name)
        self.num_prefix_tokens = 1 if cfg.model_type.startswith("clip") else 0
        self._set_norm(config.mean, config.std)

    def hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        return list(out.hidden_states)

    def layer_qk(self, block: int, hidden_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        base = getattr(self.model, "vision_model", self.model)  # transformers 5 flattened CLIPVisionModel
        layer = base.encoder.layers[block]
        attn = layer.self_attn
        x = layer.layer_norm1(hidden_in)
        q = _heads(attn.q_proj(x), attn.num_heads) * attn.scale
        k = _heads(attn.k_proj(x), attn.num_heads)
        return q, k


def _hf_dict(cfg: Any) -> dict[str, Any]:
    """A transformers config as a JSON-able dict without the bookkeeping keys."""
    d = cfg.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype"):
        d.pop(key, None)
    return d


@VISION_TOWERS.register("hf_clip", config=HFVisionTowerConfig, help="transformers CLIPVisionModel (local path)")
def _hf_clip(config: HFVisionTowerConfig) -> HFVisionTower:
    return HFVisionTower(config)


@VISION_TOWERS.register(
    "hf_siglip",
    config=HFVisionTowerConfig,
    defaults={"model_type": "siglip_vision_model", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    help="transformers SiglipVisionModel (no [CLS]; local path)",
)
def _hf_siglip(config: HFVisionTowerConfig) -> HFVisionTower:
    return HFVisionTower(config)


# --------------------------------------------------------------------------------------------------------------
# timm ViT (and mmtok's own ViT, built from timm Blocks)
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TimmViTConfig:
    """A timm VisionTransformer by name, random init or weights from a local file or folder.

    ``checkpoint`` may be a ``.safetensors`` state dict (timm's key names) or a folder in timm's hub layout
    (``config.json`` with ``architecture``, ``model_args`` and ``pretrained_cfg`` + ``model.safetensors``, as
    ``timm.models.push_to_hf_hub`` / a hub download writes it): the folder then also gives the model name, its
    arguments and the mean/std. After loading, the resolved fields are kept and ``checkpoint`` is cleared, so a
    saved MLLM rebuilds the tower without the file (its weights travel in the MLLM's own state dict).
    """

    model_name: str = "vit_tiny_patch16_224"
    kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. img_size, patch_size, embed_dim, depth, num_heads
    checkpoint: str = ""  # local .safetensors file or timm hub folder ("" = random init); pickles are refused
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    # "patch": timm's linear patchify; "conv": a convolutional stem (:class:`ConvStem`) in its place, same grid
    stem: str = "patch"
    # GroupNorm groups of the conv stem: 0 = up to 8 per layer (2-8 channels each); 1 = one group per layer, which
    # keeps the channels' relative sizes (see :class:`ConvStem` for what it did and did not change)
    stem_groups: int = 0


class ConvStem(nn.Module):
    """A stack of 3x3 convolutions in place of the ViT's patchify layer.

    Xiao et al., "Early Convolutions Help Transformers See Better" (arXiv:2106.14881): replacing the
    ``patch x patch`` stride-``patch`` projection by a few 3x3 convolutions (stride 2, channels doubling, then a
    1x1 projection to the width) makes ViTs train faster and less sensitive to the optimiser. Here the stem has
    log2(patch) stride-2 convolutions, each followed by one stride-1 convolution (more depth at little cost at
    the small resolutions mmtok's recipes use: this is what lets a 2-block tower tell Fashion-MNIST classes apart
    inside 64 px scenes within minutes), and GroupNorm instead of the paper's BatchNorm so a frozen tower, a
    batch of one and ZeRO-3 all behave alike. timm's ``HybridEmbed`` adds the final 1x1 projection.

    GroupNorm normalises each group of channels per image, so with small groups (2 channels in the first layer
    of a width-64 stem) every group comes out with unit variance whether or not the image has the colours it
    responds to; items' colours read 0.39 by a linear probe on an untrained conv-stem tower's tokens (0.86 with
    patchify, 0.51 with one group). ``groups=1`` normalises all channels together per image and keeps their
    relative sizes. It is an option, not the default: in the 30-minute segmentation recipe it did not improve
    the grounding of colour expressions (43% of test scenes, against 51% with the default groups).

    Args:
        patch: Total stride (a power of two >= 2): the token grid is ``img_size / patch`` as with patchify.
        width: Channels after the last stage (the 1x1 projection maps them to the ViT width).
        groups: GroupNorm groups per layer; 0 = the largest of 8, 4, 2, 1 that divides the channels.
    """

    def __init__(self, patch: int, width: int, in_chans: int = 3, groups: int = 0):
        super().__init__()
        stages = patch.bit_length() - 1
        if patch < 2 or 1 << stages != patch:
            raise TowerError(f"stem='conv' needs a power-of-two patch_size >= 2, got {patch}")
        if groups < 0:
            raise TowerError(f"stem_groups must be >= 0 (0 = up to 8 per layer), got {groups}")
        chans = [max(8, width >> (stages - 1 - i)) for i in range(stages)]  # doubling up to ``width``
        if groups and any(c % groups for c in chans):
            raise TowerError(f"stem_groups={groups} does not divide the stem's channels {chans}")
        layers: list[nn.Module] = []
        c_in = in_chans
        for c in chans:
            for stride, ci in ((2, c_in), (1, c)):
                layers += [
                    nn.Conv2d(ci, c, 3, stride, 1, bias=False),
                    nn.GroupNorm(groups or _groups(c), c),
                    nn.ReLU(inplace=True),
                ]
            c_in = c
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


def _conv_stem_embed(groups: int = 0, **kwargs: Any) -> nn.Module:
    """timm ``embed_layer`` factory: ``HybridEmbed`` over a :class:`ConvStem` (the grid of a patchify layer)."""
    from timm.layers import HybridEmbed

    patch = _square(kwargs.pop("patch_size"), "patch_size", "conv stem")
    stem = ConvStem(patch, kwargs["embed_dim"], kwargs.get("in_chans", 3), groups)
    return HybridEmbed(stem, patch_size=1, **kwargs)


def _block_qk(blk: nn.Module, hidden_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (scaled) and k of a timm ``Block`` from its input ``[B, T, D]`` -> ``[B, H, T, dh]`` each."""
    attn = blk.attn
    qkv = attn.qkv(blk.norm1(hidden_in))
    q, k, _ = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=attn.num_heads)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return q * attn.scale, k


class TimmViTTower(VisionTower):
    """A ``timm.models.vision_transformer.VisionTransformer`` (blocks keep ``fused_attn``)."""

    def __init__(self, config: TimmViTConfig):
        super().__init__()
        import timm

        self.config = config
        if config.checkpoint and Path(config.checkpoint).is_dir():
            folder = Path(config.checkpoint)
            meta = _json_object(folder / "config.json") if (folder / "config.json").is_file() else {}
            pre = meta.get("pretrained_cfg") or {}
            config.model_name = str(meta.get("architecture") or config.model_name)
            args = {k: v for k, v in dict(meta.get("model_args") or {}).items() if k != "num_classes"}
            config.kwargs = {**args, **config.kwargs}  # the classifier is dropped (num_classes=0) below
            if "mean" in pre and "std" in pre:  # the normalisation the weights were trained with
                config.mean, config.std = [float(v) for v in pre["mean"]], [float(v) for v in pre["std"]]
            ours = meta.get("mmtok") or {}  # seg_tower exports say "conv" and the stem's norm groups
            config.stem = str(ours.get("stem", config.stem))
            config.stem_groups = int(ours.get("stem_groups", config.stem_groups))
            config.checkpoint = str(_folder_weights(folder, ("model.safetensors", "open_clip_model.safetensors")))
        for key in ("img_size", "patch_size"):  # refuse before timm builds a model that fails at its first call
            if key in config.kwargs:
                _square(config.kwargs[key], key, config.model_name)
        if config.stem not in ("patch", "conv"):
            raise TowerError(f"tower stem must be 'patch' or 'conv', got {config.stem!r}")
        extra = (
            {"embed_layer": functools.partial(_conv_stem_embed, config.stem_groups)} if config.stem == "conv" else {}
        )
        try:
            model = timm.create_model(config.model_name, pretrained=False, num_classes=0, **config.kwargs, **extra)
        except RuntimeError as e:
            raise TowerError(f"timm cannot build {config.model_name!r}: {e}") from e
        if not hasattr(model, "blocks") or not hasattr(model, "_pos_embed"):
            raise TowerError(f"{config.model_name!r} is not a timm VisionTransformer; pick a vit_* model")
        if config.checkpoint:
            state = load_local_state_dict(config.checkpoint)
            state = {k: v for k, v in state.items() if not k.startswith("head.")}  # the classifier is not used
            try:
                missing, unexpected = model.load_state_dict(state, strict=False)
            except RuntimeError as e:  # shape mismatches: the file is for another size
                first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
                raise TowerError(
                    f"{config.checkpoint} does not fit {config.model_name} {config.kwargs}: {first}"
                ) from e
            bad = [k for k in missing if not k.startswith("head")]
            if bad:
                raise TowerError(f"{config.checkpoint} lacks {bad[:5]} for {config.model_name}")
            if unexpected:
                raise TowerError(f"{config.checkpoint} has keys {unexpected[:5]} that {config.model_name} lacks")
            logger.info("loaded %s into timm %s", config.checkpoint, config.model_name)
            config.checkpoint = ""  # resolved: a saved MLLM carries these weights itself
        self.model = model
        self.num_layers = len(model.blocks)
        self.hidden_size = model.embed_dim
        self.num_prefix_tokens = model.num_prefix_tokens
        self.image_size = _square(model.patch_embed.img_size, "img_size", config.model_name)
        # a conv stem's HybridEmbed reports patch_size 1 (on its feature map): the stride is image / grid
        self.patch_size = self.image_size // _square(model.patch_embed.grid_size, "grid", config.model_name)
        self._set_norm(config.mean, config.std)

    def hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pixel_values))))
        out = [x]
        for blk in m.blocks:
            x = blk(x)
            out.append(x)
        return out

    def layer_qk(self, block: int, hidden_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _block_qk(self.model.blocks[block], hidden_in)


VISION_TOWERS.add("timm_vit", TimmViTTower, config=TimmViTConfig, help="timm ViT by name (local weights)")


@dataclass
class MmtokViTConfig:
    """mmtok's own ViT encoder (from MAE), loaded from a hub folder written by ``mmtok train`` (kind "mim model")."""

    path: str = ""
    # no mean/std here: the encoder normalises [0, 1] pixels itself (its config's pixel_mean/pixel_std)
    # filled on first build so a saved MLLM rebuilds the encoder without the original folder
    mim_name: str = ""
    mim_config: dict[str, Any] = field(default_factory=dict)


class MmtokViTTower(VisionTower):
    """Wraps the MIM area's encoder (timm ``Block`` s, ``forward_features(x, output_hidden_states=True)``)."""

    def __init__(self, config: MmtokViTConfig):
        super().__init__()
        from mmtok import hub, registries

        self.config = config
        if config.mim_name:  # rebuilt from a saved MLLM: its weights come with the MLLM's state dict
            model = registries.get("mim model").create(config.mim_name, **config.mim_config)
        elif config.path:
            model = hub.from_pretrained(config.path, kind="mim model")
            meta = hub.read_config(config.path)
            config.mim_name, config.mim_config = meta["name"], meta["config"]
        else:
            raise TowerError("mmtok_vit needs `path`: a folder saved by an mmtok MIM training run (export/)")
        encoder = getattr(model, "encoder", model)
        for attr in ("patch_embed", "blocks", "forward_features", "embed_dim", "patch_size", "img_size"):
            if not hasattr(encoder, attr):
                raise TowerError(f"{config.path or config.mim_name} has no ViT encoder attribute {attr!r}")
        self.model = encoder
        self.num_layers = len(encoder.blocks)
        self.hidden_size = encoder.embed_dim
        self.num_prefix_tokens = 1 if getattr(encoder, "cls_token", None) is not None else 0
        self.patch_size = _first(encoder.patch_size)
        self.image_size = _first(encoder.img_size)
        self.in_chans = int(encoder.config.in_chans)
        self._set_norm([0.0], [1.0])  # identity: see preprocess

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` in [0, 1] -> [0, 1] pixels with the encoder's channels and size.

        Unlike the other towers the result stays in [0, 1]: mmtok's encoder normalises its input itself,
        exactly as it did during masked-image pretraining, so normalising here would do it twice.
        """
        if images.ndim != 4:
            raise ValueError(f"images must be [B, C, H, W] in [0, 1], got shape {tuple(images.shape)}")
        c = images.shape[1]
        if c != self.in_chans:
            if self.in_chans == 1 and c == 3:  # RGB into a grayscale encoder (e.g. Fashion-MNIST MAE)
                images = (images * torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)).sum(
                    1, keepdim=True
                )
            elif c == 1:
                images = images.expand(-1, self.in_chans, -1, -1)
            else:
                raise TowerError(f"the encoder takes {self.in_chans}-channel images, got {c} channels")
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return images

    def hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model.forward_features(pixel_values, output_hidden_states=True))

    def layer_qk(self, block: int, hidden_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _block_qk(self.model.blocks[block], hidden_in)


def _first(v: Any) -> int:
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


VISION_TOWERS.add("mmtok_vit", MmtokViTTower, config=MmtokViTConfig, help="mmtok's MAE ViT encoder (hub folder)")


# --------------------------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------------------------
@dataclass
class OpenClipConfig:
    """An open_clip vision transformer: by model name, or by a ``vision_cfg`` dict (tiny test towers)."""

    model_name: str = "ViT-B-32"
    vision_cfg: dict[str, Any] = field(default_factory=dict)  # if set, build only the visual tower from it
    embed_dim: int = 512  # output projection width of the CLIP model (unused by the MLLM, needed to build)
    # local .safetensors state dict of the CLIP model or of its `visual` part, or a folder in open_clip's hub layout
    # (open_clip_config.json with model_cfg / preprocess_cfg + open_clip_model.safetensors): the folder then gives
    # the vision config and the mean/std too. Cleared after loading (a saved MLLM carries the weights itself).
    checkpoint: str = ""
    mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    std: list[float] = field(default_factory=lambda: list(CLIP_STD))


class OpenClipTower(VisionTower):
    """``open_clip.transformer.VisionTransformer`` run block by block (its attention stays fused)."""

    def __init__(self, config: OpenClipConfig):
        super().__init__()
        import open_clip
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        self.config = config
        if config.checkpoint and Path(config.checkpoint).is_dir():
            folder = Path(config.checkpoint)
            meta = (
                _json_object(folder / "open_clip_config.json") if (folder / "open_clip_config.json").is_file() else {}
            )
            model_cfg, pre = meta.get("model_cfg") or {}, meta.get("preprocess_cfg") or {}
            if model_cfg.get("vision_cfg"):
                config.vision_cfg = dict(model_cfg["vision_cfg"])
                config.embed_dim = int(model_cfg.get("embed_dim", config.embed_dim))
            if "mean" in pre and "std" in pre:
                config.mean, config.std = [float(v) for v in pre["mean"]], [float(v) for v in pre["std"]]
            config.checkpoint = str(_folder_weights(folder, ("open_clip_model.safetensors", "model.safetensors")))
        if config.vision_cfg:
            # patch dropout (FLIP) is a pretraining device: the MLLM needs every patch, also while it trains the tower
            cfg = CLIPVisionCfg(**{**config.vision_cfg, "patch_dropout": 0.0})
            visual = _build_vision_tower(config.embed_dim, cfg)
        else:
            visual = open_clip.create_model(config.model_name, pretrained=None).visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise TowerError(f"open_clip model {config.model_name!r} has no ViT visual tower")
        if config.checkpoint:
            state = load_local_state_dict(config.checkpoint)
            if any(k.startswith("visual.") for k in state):
                state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
            try:
                visual.load_state_dict(state, strict=True)
            except RuntimeError as e:
                head = str(e).splitlines()[0]
                raise TowerError(
                    f"{config.checkpoint} does not fit open_clip {config.model_name}: {head} {str(e)[:300]}"
                ) from e
            config.checkpoint = ""  # resolved: a saved MLLM carries these weights itself
        self.model = visual
        blocks = visual.transformer.resblocks
        self.num_layers = len(blocks)
        self.hidden_size = visual.transformer.width
        self.num_prefix_tokens = 1
        self.image_size = _square(visual.image_size, "image_size", config.model_name)
        self.patch_size = _square(visual.patch_size, "patch_size", config.model_name)
        self._set_norm(config.mean, config.std)

    def hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        v = self.model
        x = v._embeds(pixel_values)  # [B, 1 + N, D]
        out = [x]
        batch_first = getattr(v.transformer, "batch_first", True)
        for blk in v.transformer.resblocks:
            x = blk(x) if batch_first else blk(x.transpose(0, 1)).transpose(0, 1)
            out.append(x)
        return out

    def layer_qk(self, block: int, hidden_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blk = self.model.transformer.resblocks[block]
        mha = blk.attn
        x = blk.ln_1(hidden_in)
        d = x.shape[-1]
        w, b = mha.in_proj_weight, mha.in_proj_bias
        q = F.linear(x, w[:d], b[:d] if b is not None else None)
        k = F.linear(x, w[d : 2 * d], b[d : 2 * d] if b is not None else None)
        h = mha.num_heads
        return _heads(q, h) * (d // h) ** -0.5, _heads(k, h)


VISION_TOWERS.add("open_clip", OpenClipTower, config=OpenClipConfig, help="open_clip ViT by name (local weights)")


# --------------------------------------------------------------------------------------------------------------
# attention rows from q/k (used by the [CLS]-attention pruners)
# --------------------------------------------------------------------------------------------------------------
def cls_attention_row(tower: VisionTower, hidden_states: list[torch.Tensor], block: int) -> torch.Tensor:
    """Head-mean attention of the [CLS] query to every patch in ``block``: ``[B, N]`` (not renormalised).

    Only the [CLS] row is computed (one query per head: ``O(T d)``), from the block's input
    ``hidden_states[block]``. For towers without a [CLS] token, returns the mean attention each patch
    *receives* from all patches (column mean of the full attention map, computed in query chunks).
    """
    q, k = tower.layer_qk(block, hidden_states[block])  # [B, H, T, dh]
    p = tower.num_prefix_tokens
    if p > 0:
        probs = torch.softmax(q[:, :, :1].float() @ k.float().transpose(-1, -2), dim=-1)  # [B, H, 1, T]
        return probs[:, :, 0, p:].mean(dim=1)  # [B, N]
    received = torch.zeros(k.shape[0], k.shape[2], device=k.device, dtype=torch.float32)
    for s in range(0, q.shape[2], 256):  # chunks keep the memory at O(256 T) per head
        probs = torch.softmax(q[:, :, s : s + 256].float() @ k.float().transpose(-1, -2), dim=-1)
        received += probs.sum(dim=2).mean(dim=1)  # sum over queries, mean over heads -> [B, T]
    return received / q.shape[2]

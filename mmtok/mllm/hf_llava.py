"""Load a transformers ``llava`` checkpoint folder (e.g. a downloaded llava-hf model) as an mmtok MLLM.

transformers itself reads the folder (every historical weight-name layout, sharded files, tied weights);
we then move its parts into an :class:`~mmtok.mllm.modeling.MLLM`: the HF vision model becomes an ``hf_clip`` /
``hf_siglip`` tower, ``multi_modal_projector`` the ``mlp2x_gelu`` projector (same parameter names), and the
language model + ``lm_head`` a causal LM of the text config's family. Nothing is copied by name guessing, so a
mismatch fails loudly in ``load_state_dict``.

Weights are read from safetensors only (``model.safetensors`` or a sharded ``model.safetensors.index.json``):
transformers would otherwise fall back to ``pytorch_model.bin``, a pickle that runs code when loaded. A folder
holding only pickled weights is refused with a message naming the file and the one-line conversion the user
can run on a file they trust (``torch.load(..., weights_only=True)`` then safetensors' ``save_file``).

Feature selection follows transformers exactly: ``vision_feature_select_strategy="default"`` drops token 0 of the
feature layer (the [CLS] of a CLIP tower, but a real patch of a SigLIP tower, which has no [CLS]: 24 of 25
features), ``"full"`` keeps every token (mmtok's ``cls_patch``); see :func:`mmtok.mllm.towers.select_features`.
LLaVA computes its logits with the plain ``lm_head`` (no family logits scaling or soft-cap), so a loaded checkpoint
gets ``logits_convention="llava"`` (:func:`mmtok.mllm.decoder.lm_logits`).

The model is built through the ``mllm`` registry, so this module imports nothing of
:mod:`mmtok.mllm.modeling` (which imports :func:`load_hf_llava` to dispatch ``MLLM.from_pretrained``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmtok import hub

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# Weight files a folder may hold that we refuse to unpickle; trainer leftovers are not weights.
PICKLED_WEIGHTS = ("*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt")
_NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "rng_state")
# transformers' vision_feature_select_strategy -> MLLMConfig.feature_select (mmtok.mllm.towers.FEATURE_SELECT)
FEATURE_SELECT = {"default": "default", "full": "cls_patch"}
# transformers config keys that say nothing about the architecture (dropped from MLLMConfig.llm)
_VOLATILE_KEYS = (
    "transformers_version",
    "architectures",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "_attn_implementation",
)


def llm_config_dict(cfg: Any) -> dict[str, Any]:
    """A transformers text config as the plain dict ``MLLMConfig.llm`` stores (with its ``model_type``)."""
    d = cfg.to_dict()
    for key in _VOLATILE_KEYS:
        d.pop(key, None)
    d["model_type"] = cfg.model_type
    return d


def check_safetensors_weights(path: Path) -> None:
    """Refuse a model folder whose weights are not safetensors, naming the file and how to convert it.

    Raises:
        hub.CheckpointError: no ``model.safetensors`` (or its sharded index) in ``path``.
    """
    if any((path / name).is_file() for name in SAFE_WEIGHTS):
        return
    pickled = sorted(
        {p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern) if p.is_file()}
        - {n for n in (p.name for p in path.iterdir()) if n.startswith(_NOT_WEIGHTS)}
    )
    if not pickled:
        raise hub.CheckpointError(f"{path}: no model.safetensors (or model.safetensors.index.json) with the weights")
    refusal = (
        f"{path}: the weights are in {', '.join(pickled)} (a pickle, which can run code when loaded), and mmtok "
        "loads safetensors only. If you trust the file, convert it once with: "
    )
    if len(pickled) == 1:
        src, dst = path / pickled[0], path / "model.safetensors"
        raise hub.CheckpointError(
            refusal + 'python -c "import torch; from safetensors.torch import save_file; '
            f"sd = torch.load('{src}', map_location='cpu', weights_only=True); "
            f"save_file({{k: v.contiguous().clone() for k, v in sd.items()}}, '{dst}', metadata={{'format': 'pt'}})\""
        )
    # Sharded: transformers reads the shards (weights_only) and writes safetensors shards plus their index.
    raise hub.CheckpointError(
        refusal + 'python -c "from transformers import LlavaForConditionalGeneration as M; '
        f"M.from_pretrained('{path}', use_safetensors=False).save_pretrained('{path}')\""
    )


def load_hf_llava(path: str | Path, **overrides: Any):
    """Build an mmtok MLLM from a local transformers LLaVA folder.

    Args:
        path: Folder with ``config.json`` (``model_type: llava``) and safetensors weights.
        overrides: MLLMConfig fields to override (e.g. ``attn_implementation``). ``tokenizer`` replaces the
            folder's own tokenizer (``tokenizer.json`` / ``tokenizer.model``, read from ``path`` whatever the
            current directory).

    Returns:
        An :class:`~mmtok.mllm.modeling.MLLM` whose logits equal transformers' for the same inputs.

    Raises:
        hub.CheckpointError: the folder has no safetensors weights (e.g. only ``pytorch_model.bin``), uses
            several vision feature layers or an unknown feature strategy.
    """
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from mmtok.mllm.towers import CLIP_MEAN, CLIP_STD, _hf_dict
    from mmtok.registries import MLLMS

    path = Path(path).resolve()  # absolute: the tokenizer path kept in the config must not depend on the cwd
    check_safetensors_weights(path)
    attn = overrides.get("attn_implementation", "sdpa")
    # use_safetensors=True: transformers must never fall back to a pickle it finds beside the safetensors.
    hf = LlavaForConditionalGeneration.from_pretrained(
        path, local_files_only=True, dtype=torch.float32, attn_implementation=attn, use_safetensors=True
    )
    cfg = hf.config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise hub.CheckpointError(f"{path}: multi-layer vision features {layer} are not supported; use one layer")
    strategy = cfg.vision_feature_select_strategy
    if strategy not in FEATURE_SELECT:
        raise hub.CheckpointError(
            f"{path}: vision_feature_select_strategy {strategy!r} is not supported; use one of {sorted(FEATURE_SELECT)}"
        )
    vcfg = cfg.vision_config
    siglip = vcfg.model_type.startswith("siglip")
    mean, std = ([0.5] * 3, [0.5] * 3) if siglip else (list(CLIP_MEAN), list(CLIP_STD))
    proc_cfg = path / "preprocessor_config.json"
    if proc_cfg.is_file():  # the checkpoint's own normalisation wins
        import json

        pc = json.loads(proc_cfg.read_text())
        mean, std = pc.get("image_mean", mean), pc.get("image_std", std)
    text = cfg.text_config
    spec = {
        "tower": {
            "name": "hf_siglip" if siglip else "hf_clip",
            "model_type": vcfg.model_type,
            "config": _hf_dict(vcfg),
            "mean": list(mean),
            "std": list(std),
        },
        "feature_layer": layer,
        "feature_select": FEATURE_SELECT[strategy],
        "projector": "mlp2x_gelu",
        "projector_act": cfg.projector_hidden_act,
        "projector_bias": bool(getattr(cfg, "multimodal_projector_bias", True)),
        "llm": {**llm_config_dict(text), "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False))},
        "image_token_id": int(cfg.image_token_id),
        "attn_implementation": attn,
        "logits_convention": "llava",  # LLaVA's own lm_head, without the text family's scaling / soft-cap
    }
    tokenizer = overrides.get("tokenizer") or ""
    # The tokenizer (and segmentation heads, which add tokens to it) are attached after the weights are in
    # place: building the MLLM with them could resize the embedding table, and the checkpoint's would not fit.
    seg_heads = overrides.get("seg_heads") or {}
    spec.update({k: v for k, v in overrides.items() if k not in ("tokenizer", "seg_heads")})
    model = MLLMS.create("llava", **spec)
    model.tower.model.load_state_dict(hf.model.vision_tower.state_dict())
    model.projector.load_state_dict(hf.model.multi_modal_projector.state_dict())
    model.llm.model.load_state_dict(hf.model.language_model.state_dict())
    model.llm.lm_head.load_state_dict(hf.lm_head.state_dict())
    if tokenizer:
        from mmtok.mllm.text import load_tokenizer

        model.tokenizer = load_tokenizer(tokenizer)
        model.config.tokenizer = tokenizer
    elif (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file():
        model.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model.tokenizer.padding_side = "left"
        if model.tokenizer.pad_token is None:
            model.tokenizer.pad_token = model.tokenizer.eos_token
        model.config.tokenizer = str(path)
    if seg_heads:
        from mmtok.mllm.seg.heads import build_seg_heads

        model.seg_heads = build_seg_heads(model, seg_heads)
    del hf
    return model

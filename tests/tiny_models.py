"""Tiny model specs shared by several test modules (import as ``from tiny_models import ...``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def fashion_vqa_shards(out: Path, *, train: int = 0, val: int = 0, test: int = 0, **options: Any) -> Path:
    """Write fashion-vqa shards with that many questions per split into ``out`` (``options``: the builder's, e.g.
    ``canvas``); returns the folder."""
    from mmtok import registries

    builders = registries.get("shard builder")
    cfg = builders.build_config("fashion-vqa", out=str(out), train=train, val=val, test=test, **options)
    builders.get("fashion-vqa").target(cfg)
    return Path(out)


def tiny_fashion_mllm(model_type: str = "qwen2", tie_word_embeddings: bool = False) -> dict[str, Any]:
    """Overrides of ``llava_fashion_small``: a 32-px, patch-8 timm ViT (16 image tokens) + a 3-layer LLM."""
    llm: dict[str, Any] = {
        "model_type": model_type,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 96,
        "max_position_embeddings": 256,
    }
    if tie_word_embeddings:
        llm["tie_word_embeddings"] = True
    return {
        "tower": {
            "name": "timm_vit",
            "model_name": "vit_tiny_patch16_224",
            "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
        },
        "llm": llm,
    }


def tiny_seg_mllm(grid: int = 4) -> dict[str, Any]:
    """``llava_fashion_seg`` overrides: the tiny fashion MLLM (16 image tokens = a 4 x 4 grid) with the seg tokenizer.

    Pass it as ``model_overrides`` of the ``mllm_seg`` task (the task adds ``seg_heads`` from its ``heads``);
    :func:`tiny_seg_heads` gives the three heads with a text grid matching the 4 x 4 patch grid.
    """
    spec = tiny_fashion_mllm("llama")
    spec["tokenizer"] = "builtin:fashion-seg"
    spec["llm"]["vocab_size"] = 1136
    return spec


def tiny_seg_heads(grid: int = 4) -> dict[str, Any]:
    return {"allmask": {}, "text": {"grid": grid, "max_new_tokens": 48}, "segtoken": {"dim": 16}}

"""configs/mllm/fashion_vqa_clip_tower.yaml: the fashion-vqa MLLM on the tower of configs/clip/fashion_vqa_clip.yaml.

The recipe exists to test FasterVLM's premise (arXiv:2412.01818) on a contrastively trained [CLS], so the tests pin
what that needs: the CLIP export loads as the tower with the LLaVA geometry (576 patches, penultimate block,
[CLS] dropped), the tower stays frozen in the stage-2 task, and ``cls_attention`` selects by the [CLS] row of the
block whose output feeds the LLM, as torch's own ``nn.MultiheadAttention`` computes it eagerly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmtok import registries
from mmtok.train.config import load_run_config

CONFIG = "configs/mllm/fashion_vqa_clip_tower.yaml"
CLIP_CONFIG = "configs/clip/fashion_vqa_clip.yaml"


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory):
    """An untrained export of the CLIP recipe's architecture (the geometry and the loading path are under test, not
    what the weights learned)."""
    clip = load_run_config([CLIP_CONFIG])
    torch.manual_seed(0)
    task = registries.get("task").create("clip", **{k: v for k, v in clip.task.items() if k != "name"})
    out = tmp_path_factory.mktemp("clip") / "export"
    task.export(out)
    return out


def _model_overrides(export: Path) -> dict:
    run = load_run_config([CONFIG])
    over = dict(run.task["model_overrides"])
    return {**over, "tower": {**over["tower"], "checkpoint": str(export)}}


def test_config_names_the_clip_recipes_export():
    run = load_run_config([CONFIG])
    clip = load_run_config([CLIP_CONFIG])
    assert run.task["name"] == "mllm_stage2" and not run.task["train_tower"]
    tower = run.task["model_overrides"]["tower"]
    assert tower == {"name": "open_clip", "checkpoint": f"{clip.output_dir}/export"}
    assert run.task["model_overrides"]["feature_layer"] == -2
    assert run.output_dir == "runs/mllm_fashion_vqa_clip"
    assert run.output_dir in Path(CONFIG).read_text()  # the header's eval commands name this run


def test_clip_export_is_the_frozen_tower(clip_export):
    from safetensors.torch import load_file

    run = load_run_config([CONFIG])
    task = registries.get("task").create(
        "mllm_stage2",
        **{**{k: v for k, v in run.task.items() if k != "name"}, "model_overrides": _model_overrides(clip_export)},
    )
    model = task.model
    assert model.num_image_tokens == 576  # 96 px / patch 4, [CLS] dropped: LLaVA-1.5's count
    assert model.feature_index == model.tower.num_layers - 1 == 3  # penultimate block of 4
    assert not any(p.requires_grad for p in model.tower.parameters())
    assert any(p.requires_grad for p in model.llm.parameters()) and all(
        p.requires_grad for p in model.projector.parameters()
    )
    exported = load_file(str(clip_export / "open_clip_model.safetensors"))
    visual = {k[len("visual.") :]: v for k, v in exported.items() if k.startswith("visual.")}
    mine = model.tower.model.state_dict()
    assert visual.keys() == mine.keys()
    for k, v in visual.items():
        torch.testing.assert_close(mine[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["cls_attention", "vtc_cls"])
def test_cls_pruners_select_by_the_eager_cls_row(clip_export, method):
    """The MLLM's own pre-LLM context scores the 576 image tokens by [CLS] attention (head mean, patches only) of
    the feature block (FasterVLM) or summed over blocks 0..feature block (VTC-CLS): equal to the attention weights
    ``nn.MultiheadAttention`` returns eagerly, and the kept tokens are their top 64."""
    model = registries.get("mllm").create("llava_fashion_small", **_model_overrides(clip_export)).eval()
    torch.manual_seed(1)
    images = torch.rand(2, 3, 96, 96)
    ids = torch.tensor([[model.config.image_token_id, 5, 6]] * 2)
    with torch.no_grad():
        prep = model.prepare(ids, torch.ones_like(ids), images=images)
        hs = prep.ctx.tower_hidden
        feature_block = prep.ctx.feature_block
        assert feature_block == 2  # the block whose output is hidden state 3 = the penultimate one
        blocks = [feature_block] if method == "cls_attention" else list(range(feature_block + 1))
        expected = torch.zeros(2, 576)
        for b in blocks:
            blk = model.tower.model.transformer.resblocks[b]
            x = blk.ln_1(hs[b])
            _, w = blk.attn(x, x, x, need_weights=True, average_attn_weights=True)  # [B, 577, 577], head mean
            expected += w[:, 0, 1:]  # the [CLS] query's row, patch keys only (not renormalised)
        pruner = registries.get("pruner").create(method, num_keep=64)
        scores = pruner.scores(prep.ctx)
        keep = pruner.select(prep.ctx)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-4)
    assert keep.tolist() == expected.topk(64, dim=1).indices.sort(dim=1).values.tolist()

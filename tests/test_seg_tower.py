"""Dense tower pretraining (``seg_tower``) and the convolutional stem of the timm tower."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from launching import short_run_args

from mmtok.mllm.seg.tower import DenseTowerConfig, DenseTowerTask, patch_class_targets
from mmtok.mllm.towers import ConvStem, TimmViTConfig, TimmViTTower, TowerError

TINY = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}


def test_patch_targets_are_the_class_shares_of_each_patch():
    inst = np.zeros((4, 4), np.uint8)
    inst[0, 0] = 1  # item 1 (class 3): one pixel of the top-left 2x2 patch
    inst[2:, 2:] = 2  # item 2 (class 0): the whole bottom-right patch
    inst[2, 0] = 2  # ... and one pixel of the bottom-left patch
    t = patch_class_targets(inst, [{"class_id": 3}, {"class_id": 0}], patch=2, num_classes=4)
    want = np.zeros((4, 5), np.float32)
    want[0, [0, 4]] = [0.75, 0.25]
    want[1, 0] = 1.0
    want[2, [0, 1]] = [0.75, 0.25]
    want[3, 1] = 1.0
    np.testing.assert_allclose(t, want)


def test_colour_targets_use_the_palette_order():
    inst = np.zeros((2, 2), np.uint8)
    inst[0] = 1
    inst[1, 1] = 2
    t = patch_class_targets(inst, [{"colour": "blue"}, {"colour": "red"}], 2, 3, "colour", ["red", "green", "blue"])
    np.testing.assert_allclose(t, [[0.25, 0.25, 0.0, 0.5]])
    with pytest.raises(ValueError, match="colour_weight=0"):
        patch_class_targets(inst, [{"colour": "teal"}, {"colour": "red"}], 2, 3, "colour", ["red", "green", "blue"])


def test_patch_targets_refuse_bad_class_ids_and_grids():
    inst = np.ones((4, 4), np.uint8)
    with pytest.raises(ValueError, match="num_classes"):
        patch_class_targets(inst, [{"class_id": 10}], patch=2, num_classes=10)
    with pytest.raises(ValueError, match="divisible"):
        patch_class_targets(np.ones((5, 4), np.uint8), [{"class_id": 1}], patch=2, num_classes=10)


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_conv_stem_keeps_the_patchify_grid(patch):
    kw = dict(TINY, patch_size=patch)
    conv = TimmViTTower(TimmViTConfig(kwargs=kw, stem="conv"))
    plain = TimmViTTower(TimmViTConfig(kwargs=kw))
    assert (conv.patch_size, conv.num_patches) == (plain.patch_size, plain.num_patches) == (patch, (32 // patch) ** 2)
    x = torch.rand(2, 3, 32, 32)
    assert conv.hidden_states(conv.preprocess(x))[-1].shape == plain.hidden_states(plain.preprocess(x))[-1].shape
    assert isinstance(conv.model.patch_embed.backbone, ConvStem)
    strides = [m.stride[0] for m in conv.model.patch_embed.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert int(np.prod(strides)) == patch  # log2(patch) stride-2 convolutions, each followed by a stride-1 one


def test_conv_stem_refuses_a_patch_that_is_not_a_power_of_two():
    with pytest.raises(TowerError, match="power-of-two"):
        TimmViTTower(TimmViTConfig(kwargs=dict(TINY, img_size=36, patch_size=6), stem="conv"))
    with pytest.raises(TowerError, match="stem"):
        TimmViTTower(TimmViTConfig(kwargs=TINY, stem="convnext"))


def test_conv_stem_norm_groups_and_an_mllm_keeps_them(tmp_path):
    from tiny_models import tiny_seg_mllm

    from mmtok.mllm.modeling import MLLM
    from mmtok.registries import MLLMS

    def groups(tower):
        return {m.num_groups for m in tower.model.patch_embed.backbone.modules() if isinstance(m, torch.nn.GroupNorm)}

    assert groups(TimmViTTower(TimmViTConfig(kwargs=TINY, stem="conv"))) == {8}  # 16 and 32 channels: 8 groups
    one = TimmViTTower(TimmViTConfig(kwargs=TINY, stem="conv", stem_groups=1))
    assert groups(one) == {1}
    with pytest.raises(TowerError, match="does not divide"):
        TimmViTTower(TimmViTConfig(kwargs=TINY, stem="conv", stem_groups=3))
    with pytest.raises(TowerError, match=">= 0"):
        TimmViTTower(TimmViTConfig(kwargs=TINY, stem="conv", stem_groups=-1))
    spec = tiny_seg_mllm()
    spec["tower"] = {**spec["tower"], "stem": "conv", "stem_groups": 1}
    model = MLLMS.create("llava_fashion_seg", **spec)
    model.save_pretrained(tmp_path / "m")
    again = MLLM.from_pretrained(tmp_path / "m")
    assert groups(again.tower) == {1}
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(
        again.tower.hidden_states(again.tower.preprocess(x))[-1],
        model.tower.hidden_states(model.tower.preprocess(x))[-1],
    )


def test_dense_pretraining_learns_and_its_export_loads_as_the_mllm_tower(seg_scenes, tmp_path):
    from mmtok.mllm.modeling import MLLM
    from mmtok.registries import MLLMS
    from mmtok.train.config import load_run_config
    from mmtok.train.engine import train

    tower = json.dumps({"name": "timm_vit", "kwargs": TINY, "stem": "conv"}).replace(" ", "")
    over = short_run_args(seg_scenes, tmp_path / "run", steps=30, batch_size=8)
    over += [f"task.tower={tower}", "task.name=seg_tower", "optim.lr=3e-3"]
    cfg = load_run_config(["configs/mllm/seg_tower_cpu.yaml"], over)
    summary = train(cfg)
    assert {"loss", "patch_accuracy", "fg_accuracy", "colour_fg_accuracy"} <= set(summary["eval"])
    # learned something from the pixels: better than the best constant guess (the class prior of the val patches)
    task = DenseTowerTask(DenseTowerConfig(tower={"name": "timm_vit", "kwargs": TINY, "stem": "conv"}))
    assert DenseTowerTask(DenseTowerConfig(tower=task.config.tower, colour_weight=0)).colour_head is None
    from mmtok.data import ShardDataset

    tf = task.sample_transform("val")
    targets = torch.cat([tf(s)["target"] for s in ShardDataset(f"{seg_scenes}/val-*.tar")])
    prior = targets.mean(0)
    prior_ce = float(-(targets * prior.clamp_min(1e-8).log()).sum(-1).mean())
    assert summary["eval"]["loss"] < 0.9 * prior_ce, (summary["eval"], prior_ce)
    export = tmp_path / "run" / "export"
    meta = json.loads((export / "config.json").read_text())
    assert meta["mmtok"]["stem"] == "conv" and meta["model_args"]["patch_size"] == 4

    # the folder loads as the timm_vit tower with the trained weights ...
    loaded = TimmViTTower(TimmViTConfig(checkpoint=str(export)))
    from safetensors.torch import load_file

    task.tower.model.load_state_dict(load_file(str(export / "model.safetensors")))
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(
        loaded.hidden_states(loaded.preprocess(x))[-1], task.tower.hidden_states(task.tower.preprocess(x))[-1]
    )
    # ... and as an MLLM's tower, which carries the weights itself once saved
    spec = MLLMS.build_config("llava_fashion_seg")
    llm = dict(
        spec.llm,
        hidden_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    model = MLLMS.create("llava_fashion_seg", tower={"name": "timm_vit", "checkpoint": str(export)}, llm=llm)
    model.save_pretrained(tmp_path / "mllm")
    again = MLLM.from_pretrained(tmp_path / "mllm")
    torch.testing.assert_close(
        again.tower.hidden_states(again.tower.preprocess(x))[-1], loaded.hidden_states(loaded.preprocess(x))[-1]
    )

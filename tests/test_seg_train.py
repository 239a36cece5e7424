"""The ``mllm_seg`` task through the engine: one process, DDP and DeepSpeed ZeRO-2/3 on 2 CPU processes (gloo);
the exported folder segments with every head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import free_port, short_run_args
from tiny_models import tiny_seg_heads, tiny_seg_mllm

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def scenes(seg_scenes):
    return seg_scenes


def _overrides(scenes: Path, out: Path, steps: int = 3) -> list[str]:
    model = json.dumps(tiny_seg_mllm()).replace(" ", "")
    heads = json.dumps(tiny_seg_heads()).replace(" ", "")
    return short_run_args(scenes, out, steps, batch_size=6) + [
        f"task.model_overrides={model}",
        f"task.heads={heads}",
        'task.head_mix={"allmask":0.4,"segtoken":0.3,"text":0.3}',
    ]


def test_train_seg_recipe_one_process_and_segment_with_the_export(scenes, tmp_path):
    from mmtok.mllm.modeling import MLLM
    from mmtok.train.config import load_run_config
    from mmtok.train.engine import train

    cfg = load_run_config(["configs/mllm/seg_scenes_cpu.yaml"], _overrides(scenes, tmp_path / "run"))
    summary = train(cfg)
    assert {"allmask/ciou", "segtoken/ciou", "text/loss", "allmask/loss"} <= set(summary["eval"])
    model = MLLM.from_pretrained(tmp_path / "run" / "export").eval()
    assert list(model.seg_heads) == ["allmask", "segtoken", "text"]
    images = torch.rand(2, 3, 32, 32)
    for head in model.seg_heads:
        assert model.segment(images, ["the bag", "the red sneaker"], head=head).masks.shape == (2, 32, 32)


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [0, 2, 3])  # 0 = DDP
def test_seg_task_on_two_processes(scenes, tmp_path, stage):
    pytest.importorskip("deepspeed")
    out = tmp_path / f"stage{stage}"
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "mmtok.train",
        "--config",
        str(REPO / "configs/mllm/seg_scenes_cpu.yaml"),
        *_overrides(scenes, out),
    ]
    if stage:
        cmd += ["deepspeed.enabled=true", f"deepspeed.config={REPO}/configs/ds/zero{stage}.json"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    env_json = json.loads((out / "env.json").read_text())
    assert env_json["backend"] == ("deepspeed" if stage else "ddp") and env_json["world_size"] == 2
    from mmtok.mllm.modeling import MLLM

    model = MLLM.from_pretrained(out / "export").eval()
    assert model.segment(torch.rand(1, 3, 32, 32), ["the bag"], head="allmask").masks.shape == (1, 32, 32)


@pytest.mark.parametrize(
    ("name", "heads"),
    [
        ("seg_scenes_cpu", {"allmask", "segtoken"}),
        ("seg_smollm2_lora", {"allmask", "text", "segtoken"}),
        ("seg_llava_lora", {"allmask", "text", "segtoken"}),
    ],
)
def test_seg_configs_validate(name, heads):
    from mmtok.train.config import load_run_config

    run = load_run_config([f"configs/mllm/{name}.yaml"])
    assert run.task["name"] == "mllm_seg" and set(run.task["heads"]) == heads
    assert set(run.task["head_mix"]) <= heads


def test_seg_scenes32_recipe_matches_its_shards():
    from mmtok.train.config import load_run_config

    run = load_run_config(["configs/mllm/seg_scenes32_cpu.yaml"])
    assert run.task["name"] == "mllm_seg" and set(run.task["heads"]) == {"allmask", "segtoken"}
    assert run.task["model_overrides"]["tower"]["kwargs"]["img_size"] == 32 and "scenes32" in run.data.train


def _tiny_llava_folder(path: Path) -> Path:
    """A random transformers LLaVA folder (CLIP 32 px / patch 8 + Llama) with the built-in word tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from mmtok.mllm.text import build_fashion_tokenizer

    tok = build_fashion_tokenizer(seg=True)
    vision = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tok),
        max_position_embeddings=512,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.deepspeed
def test_seg_llava_lora_recipe_on_a_tiny_llava_folder(scenes, tmp_path):
    """The GPU recipe, checked on CPU: a local transformers LLaVA folder + heads, LoRA, DeepSpeed ZeRO-2."""
    pytest.importorskip("deepspeed")
    from mmtok.mllm.modeling import MLLM

    folder = _tiny_llava_folder(tmp_path / "llava")
    out = tmp_path / "run"
    over = [o for o in _overrides(scenes, out) if not o.startswith("task.model_overrides")]
    cmd = [
        sys.executable,
        "-m",
        "mmtok.cli.main",
        "train",
        "--config",
        "configs/mllm/seg_llava_lora.yaml",
        *over,
        f"task.init={folder}",
        "data.num_workers=0",
        f"deepspeed.config={REPO}/configs/ds/zero2.json",
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert json.loads((out / "env.json").read_text())["backend"] == "deepspeed"
    model = MLLM.from_pretrained(out / "export").eval()  # LoRA merged: a plain MLLM folder with heads
    assert list(model.seg_heads) == ["allmask", "segtoken", "text"]
    assert model.segment(torch.rand(1, 3, 32, 32), ["the bag"], head="segtoken").masks.shape == (1, 32, 32)


@pytest.mark.slow
def test_seg_smollm2_lora_recipe_trains(scenes, tmp_path):
    pytest.importorskip("gguf")
    from mmtok.train.config import load_run_config
    from mmtok.train.engine import train

    over = [o for o in _overrides(scenes, tmp_path / "run", steps=2) if not o.startswith("task.model_overrides")]
    over = [o for o in over if not o.startswith("task.heads")] + ["data.batch_size=3"]
    cfg = load_run_config(["configs/mllm/seg_smollm2_lora.yaml"], over)
    summary = train(cfg)
    assert summary["steps"] == 2 and "allmask/ciou" in summary["eval"]

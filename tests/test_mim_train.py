"""Training MIM models: a tiny run whose loss falls, `mmtok train` end to end (single process and
DeepSpeed), token-shard MTM training, and `mmtok eval mim`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from launching import free_port

from mmtok import registries

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MICRO = {"model": "mae_micro", "model_args": {"img_size": 28, "patch_size": 7, "in_chans": 1}}


def test_tiny_mae_run_loss_falls(fmnist_dir):
    from mmtok.data.sources.fashion_mnist import load_fashion_mnist
    from mmtok.mim.pretrain_fast import FastPretrainConfig, pretrain_in_memory

    images = load_fashion_mnist("train", fmnist_dir)[0][:1024]
    cfg = FastPretrainConfig(task=MICRO, batch_size=64, lr=3e-3, max_steps=80, log_every=0)
    task, log = pretrain_in_memory(images, cfg)
    assert log["steps"] == 80
    assert log["loss_last"] < 0.8 * log["loss_first"]


@pytest.mark.parametrize("masker", ["block", "attention", "adaptive", "hard_patch"])
def test_every_masker_trains_through_the_task(masker):
    task = registries.get("task").create("mae", masker=masker, total_steps=4, **MICRO)
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
    batch = task.synthetic_batch(8)
    before = [p.detach().clone() for p in task.parameters() if p.requires_grad]
    for _ in range(3):
        out = task(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert torch.isfinite(out["loss"])
    changed = [not torch.equal(a, b) for a, b in zip(before, [p for p in task.parameters() if p.requires_grad])]
    assert all(changed)  # every trainable parameter (sampler, loss head included) got a gradient
    if masker in ("attention", "hard_patch"):  # the EMA teacher follows the student
        assert not torch.equal(task.teacher.encoder.cls_token, before[0])
    if masker == "hard_patch":
        assert int(task.step) == 3 and "ranking_loss" in out


def test_sample_transform_fits_inputs_to_the_model():
    task = registries.get("task").create("mae", **MICRO)
    tf = task.sample_transform("val")
    s = tf({"image": torch.rand(3, 56, 56), "label": 4})
    assert s["x"].shape == (1, 28, 28) and s["label"] == 4
    vid = registries.get("task").create(
        "mae",
        model="videomae_micro",
        model_args={"img_size": 32, "patch_size": 8, "num_frames": 4},
        masker="tube",
        mask_ratio=0.75,
    )
    s = vid.sample_transform("train")({"video": torch.rand(3, 16, 64, 64), "label": 1})
    assert s["x"].shape == (3, 4, 32, 32)
    with pytest.raises(KeyError, match="video"):
        vid.sample_transform("train")({"image": torch.rand(3, 32, 32), "__key__": "a"})


def test_eval_mim_probe_and_figure(tmp_path, fmnist_dir):
    from mmtok.mim.evaluate import main

    model = registries.get("mim model").create("mae_micro", **MICRO["model_args"])
    model.save_pretrained(tmp_path / "run" / "export" / "mae")
    out = tmp_path / "metrics.json"
    fig = tmp_path / "recon.png"
    rc = main(
        [
            "--model",
            str(tmp_path / "run"),
            "--limit-train",
            "1500",
            "--limit-test",
            "300",
            "--probe-c",
            "0.1",
            "--figure",
            str(fig),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    metrics = json.loads(out.read_text())
    assert 0.3 < metrics["probe_accuracy"] <= 1.0 and metrics["features"] == 32
    from PIL import Image

    assert Image.open(fig).size[0] > 3 * 28
    assert main(["--model", str(tmp_path / "nothing")]) == 2


def _fmnist_shards(out: Path, n: int = 256) -> Path:
    from mmtok.data.sources.fashion_mnist import FashionMNISTShardsConfig, build_fashion_mnist

    build_fashion_mnist(FashionMNISTShardsConfig(out=str(out), limit=n, maxcount=128))
    return out


def _mae_overrides(shards: Path, out: Path, steps: int = 12) -> list[str]:
    return [
        "task.model=mae_micro",
        "task.model_args={img_size: 28, patch_size: 7, in_chans: 1}",
        f"task.total_steps={steps}",
        f"data.train={shards}/train-*.tar",
        f"data.val={shards}/test-*.tar",
        "data.batch_size=16",
        "data.num_workers=0",
        "data.shuffle_buffer=64",
        f"train.steps={steps}",
        "train.log_every=4",
        "train.eval_batches=2",
        "train.progress=false",
        "optim.warmup_steps=2",
        f"output_dir={out}",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("masker", ["random", "hard_patch"])
def test_mmtok_train_mae_end_to_end(tmp_path, masker):
    from mmtok.mim import ViTEncoder
    from mmtok.train.config import load_run_config
    from mmtok.train.engine import train

    shards = _fmnist_shards(tmp_path / "shards")
    out = tmp_path / "run"
    cfg = load_run_config(
        [REPO / "configs" / "mim" / "mae_fmnist.yaml"], [*_mae_overrides(shards, out), f"task.masker={masker}"]
    )
    summary = train(cfg)
    assert summary["steps"] == 12
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(np.isfinite(losses))
    enc = ViTEncoder.from_pretrained(out / "export" / "encoder")
    assert enc.forward_features(torch.rand(2, 1, 28, 28))[0].shape == (2, 17, 32)
    res = subprocess.run(
        [str(BIN / "mmtok"), "eval", "mim", "--model", str(out), "--limit-train", "600", "--limit-test", "200"]
        + ["--attentive", "--attentive-epochs", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "probe_accuracy" in res.stdout and '"attentive_probe_accuracy"' in res.stdout


@pytest.mark.slow
def test_mmtok_train_mtm_on_token_shards(tmp_path):
    from mmtok.data import write_shards
    from mmtok.mim import MTM
    from mmtok.train.config import load_run_config
    from mmtok.train.engine import train

    rng = np.random.default_rng(0)
    samples = [
        {"__key__": f"s{i:04d}", "codes.npy": rng.integers(0, 32, (4, 4)).astype(np.int16), "json": {"split": "train"}}
        for i in range(64)
    ]
    write_shards(samples, tmp_path / "tokens", prefix="train", maxcount=32)
    out = tmp_path / "run"
    cfg = load_run_config(
        [REPO / "configs" / "mim" / "mtm_vq.yaml"],
        [
            "task.model=mtm_micro",
            "task.model_args={codebook_size: 32, grid_h: 4, grid_w: 4}",
            f"data.train={tmp_path}/tokens/train-*.tar",
            "data.val=''",
            "data.batch_size=16",
            "data.num_workers=0",
            "train.steps=6",
            "train.progress=false",
            f"output_dir={out}",
        ],
    )
    assert train(cfg)["steps"] == 6
    model = MTM.from_pretrained(out / "export" / "mtm")
    assert (model.generate(2, steps=3) < 32).all()


@pytest.mark.slow
@pytest.mark.deepspeed
def test_mmtok_train_mae_deepspeed_zero2(tmp_path):
    pytest.importorskip("deepspeed")
    shards = _fmnist_shards(tmp_path / "shards", n=256)
    out = tmp_path / "run"
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "mmtok.train",
        "--config",
        str(REPO / "configs" / "mim" / "mae_fmnist.yaml"),
        *_mae_overrides(shards, out, steps=6),
        "deepspeed.config=configs/ds/zero2.json",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=500)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert (out / "ds_config.json").is_file()
    assert (out / "export" / "encoder" / "model.safetensors").is_file()


@pytest.mark.slow
def test_eval_mim_video_probe_on_moving_fashion_shards(tmp_path):
    from mmtok.data.sources.moving import MovingFashionConfig, build_moving_fashion
    from mmtok.mim.evaluate import main

    build_moving_fashion(MovingFashionConfig(out=str(tmp_path / "mv"), train=24, val=0, test=12, frames=8, size=32))
    model = registries.get("mim model").create(
        "videomae_micro", img_size=32, patch_size=8, in_chans=3, num_frames=4, tubelet_size=2
    )
    model.save_pretrained(tmp_path / "vmae")
    out = tmp_path / "m.json"
    args = ["--model", str(tmp_path / "vmae"), "--out", str(out), "--figure", str(tmp_path / "v.png")]
    args += ["--video-train", f"{tmp_path}/mv/train-*.tar", "--video-test", f"{tmp_path}/mv/test-*.tar"]
    args += ["--attentive", "--attentive-epochs", "2", "--attentive-layer", "-2"]
    assert main(args) == 0
    metrics = json.loads(out.read_text())
    assert metrics["train_clips"] == 24 and metrics["test_clips"] == 12
    assert 0.0 <= metrics["video_probe_accuracy"] <= 1.0
    assert 0.0 <= metrics["video_attentive_probe_accuracy"] <= 1.0
    assert metrics["video_attentive_probe_layer"] == -2 and metrics["video_attentive_probe_epochs"] == 2
    assert (tmp_path / "v.png").is_file()


@pytest.mark.slow
def test_eval_mim_mtm_accuracy_and_maskgit_grid_with_a_real_tokenizer(tmp_path):
    from mmtok.data import write_shards
    from mmtok.mim.evaluate import main

    tok = registries.get("tokenizer").create("vq_tiny_f4")  # 32 px -> 8x8 codes from 256
    tok.save_pretrained(tmp_path / "tok")
    mtm = registries.get("mim model").create("mtm_micro", codebook_size=256, grid_h=8, grid_w=8)
    mtm.save_pretrained(tmp_path / "mtm")
    rng = np.random.default_rng(0)
    samples = [{"__key__": f"s{i}", "codes.npy": rng.integers(0, 256, (8, 8)).astype(np.int16)} for i in range(20)]
    write_shards(samples, tmp_path / "tokens", prefix="test")
    out, fig = tmp_path / "m.json", tmp_path / "samples.png"
    args = ["--model", str(tmp_path / "mtm"), "--codes", f"{tmp_path}/tokens/test-*.tar", "--out", str(out)]
    assert main([*args, "--tokenizer", str(tmp_path / "tok"), "--figure", str(fig), "--steps", "4"]) == 0
    metrics = json.loads(out.read_text())
    assert set(metrics) >= {"mtm_accuracy@0.25", "mtm_accuracy@0.5", "mtm_accuracy@0.75"}
    from PIL import Image

    assert Image.open(fig).size[0] >= 8 * 32
    assert main([*args, "--figure", str(fig)]) == 2  # a sample grid needs a tokenizer: clear error


@pytest.mark.parametrize("extra", [[], ["videomae_moving_fashion_adaptive.yaml"]])
def test_videomae_recipes_damp_the_noisy_background_targets(extra):
    """The moving-fashion recipes build a VideoMAE whose target epsilon is 0.05 (the config header says why),
    and the recipe's model gives background-like noise a target far below unit variance."""
    from mmtok.train.config import load_run_config
    from mmtok.train.engine import create_task

    files = [REPO / "configs/mim/videomae_moving_fashion.yaml"] + [REPO / "configs/mim" / f for f in extra]
    cfg = load_run_config(files, [])
    task = create_task(cfg)
    model = task.model
    assert model.is_video and model.config.norm_pix_eps == 0.05
    assert task.config.masker == ("adaptive" if extra else "tube")
    c = model.config
    noise = 0.1 + torch.randn(1, 3, c.num_frames, c.img_size, c.img_size) * (3 / 255)  # dark, std 3/255
    t, _, _ = model.targets(noise.clamp(0, 1))
    assert 0.05 < t.std() < 0.3  # 1e-6 would make it ~1

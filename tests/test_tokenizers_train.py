"""Tokenizer training behaviour: loss falls with healthy usage, PCA-like ordering, GAN plumbing,
token shards, `mmtok eval tokenizer`, and `mmtok train` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmtok import hub, registries
from mmtok.tokenizers.pca1d import explained_variance, pca_property
from mmtok.tokenizers.tasks import prepare_images

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fmnist():
    from mmtok.data.sources.fashion_mnist import load_fashion_mnist

    tr, ytr = load_fashion_mnist("train")
    te, _ = load_fashion_mnist("test")
    to = lambda a: torch.from_numpy(a.copy()).float().div(255)[:, None]  # noqa: E731
    return to(tr[:6000]), ytr[:6000], to(te[:256])


def _fit(task, images, steps, batch=32, lr=3e-3, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    logs = []
    for _ in range(steps):
        out = task({"image": images[torch.randint(0, len(images), (batch,))]})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        logs.append({k: float(v.detach()) for k, v in out.items()})
    return logs


def test_vq_training_loss_falls_and_usage_stays_high(fmnist):
    train, _, test = fmnist
    task = registries.get("task").create(
        "tokenizer", tokenizer="vq_tiny_f4", model={"image_size": 16, "base_channels": 8, "codebook_size": 64}
    )
    logs = _fit(task, train, 120)
    first = np.mean([r["rec"] for r in logs[:5]])
    last = np.mean([r["rec"] for r in logs[-10:]])
    assert last < 0.6 * first, (first, last)
    assert logs[-1]["usage"] >= 0.5, logs[-1]  # k-means init + dead-code restart keep the book alive
    ev = task.evaluate([{"image": test[i : i + 64]} for i in range(0, 256, 64)])
    assert ev["psnr"] > 14 and 0 < ev["ssim"] <= 1 and ev["usage"] >= 0.5 and ev["perplexity"] > 10


def test_pca1d_explained_variance_is_ordered(fmnist):
    train, _, test = fmnist
    task = registries.get("task").create(
        "tokenizer",
        tokenizer="pca1d_tiny_k8",
        recon_loss="l2",
        model={"image_size": 16, "width": 32, "depth": 2, "num_heads": 2},
    )
    _fit(task, prepare_images(train, 16, 1), 200, batch=64)
    ev = explained_variance(task.tokenizer, prepare_images(test, 16, 1) * 2 - 1)
    check = pca_property(ev, tol=0.01)
    assert check["monotone"] and check["diminishing"], (ev, check)
    assert ev[0] > 0.1 and ev[-1] - ev[0] > 0.05, ev  # the first slot explains a lot, later ones add


def test_gan_terms_reach_only_their_own_player(fmnist):
    train, _, _ = fmnist
    task = registries.get("task").create(
        "tokenizer",
        tokenizer="vq_tiny_f4",
        model={"image_size": 16, "base_channels": 8, "codebook_size": 32},
        perceptual_weight=0.5,
        disc_weight=0.1,
        disc_start=1,
        disc_width=8,
    )
    batch = {"image": train[:8]}
    out = task(batch)
    assert float(out["gan_on"]) == 0.0 and "perceptual" in out  # delayed start
    out = task(batch)
    assert float(out["gan_on"]) == 1.0 and float(out["gan_w"]) > 0 and "d_loss" in out
    out["loss"].backward()
    assert all(p.grad is not None for p in task.discriminator.parameters())
    assert not any(p.requires_grad for p in task.perceptual.parameters())
    # one optimizer, two objectives: the generator term reaches only the reconstruction,
    # the discriminator loss only the discriminator
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    recon = (x + 0.1 * torch.randn_like(x)).requires_grad_()
    task.config.adaptive_disc_weight = False  # this recon does not come from the decoder's last layer
    rec = (recon - x).abs().mean()
    g_term, d_loss = task._gan_terms(x, recon, rec, {})
    d_params = list(task.discriminator.parameters())
    g_grads = torch.autograd.grad(g_term, [recon, *d_params], allow_unused=True, retain_graph=True)
    assert g_grads[0].abs().sum() > 0 and all(g is None for g in g_grads[1:])
    d_grads = torch.autograd.grad(d_loss, [recon, *d_params], allow_unused=True)
    assert d_grads[0] is None and all(g is not None for g in d_grads[1:])


def test_token_shards_and_eval_cli(tmp_path, fmnist):
    from mmtok.data import ShardDataset, write_shards
    from mmtok.tokenizers import evaluate

    train, labels, _ = fmnist
    model = registries.get("tokenizer").create("vq_tiny_f4", image_size=16, base_channels=8, codebook_size=64)
    model.train()
    model(prepare_images(train[:64], 16, 1) * 2 - 1)  # k-means init
    model.eval()
    tok_dir = model.save_pretrained(tmp_path / "tok")
    imgs = (train[:40, 0].numpy() * 255).astype(np.uint8)
    write_shards(
        (
            {"__key__": f"s{i:04d}", "png": imgs[i], "cls": int(labels[i]), "json": {"source": "t", "split": "train"}}
            for i in range(40)
        ),
        tmp_path / "img",
        prefix="train",
        maxcount=25,
    )
    summary = registries.get("shard builder").create(
        "tokens", out=str(tmp_path / "tok_shards"), tokenizer=str(tok_dir), shards=str(tmp_path / "img/train-*.tar")
    )
    # the builder is a function: registry.create with a config calls it with the config
    assert summary["samples"] == 40 and summary["dtype"] == "int16" and summary["tokens_shape"] == [4, 4]
    samples = sorted(ShardDataset(str(tmp_path / "tok_shards/tokens-*.tar")), key=lambda s: s["__key__"])
    assert len(samples) == 40 and samples[3]["label"] == int(labels[3])
    assert samples[0]["json"]["tokenizer"] == "vq_tiny_f4"
    want = model.tokenize(prepare_images(train[:40], 16, 1) * 2 - 1)
    got = torch.stack([s["codes"] for s in samples])
    assert torch.equal(got, want)

    rc = evaluate.main(
        [
            "--tokenizer",
            str(tok_dir),
            "--n",
            "48",
            "--bpe-merges",
            "16",
            "--bpe-train-n",
            "200",
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    assert rc == 0
    m = json.loads((tmp_path / "eval/metrics.json").read_text())
    for key in ("psnr", "ssim", "usage", "perplexity", "fid_mobilenetv2", "tokens_per_image", "bpe"):
        assert key in m, key
    assert m["tokens_per_image"] == 16 and m["bpe"]["tokens_per_image"] <= 16
    assert (tmp_path / "eval/recon_grid.png").stat().st_size > 0
    assert evaluate.main(["--tokenizer", str(tmp_path / "nope")]) == 2


@pytest.mark.slow
def test_mmtok_train_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    py = sys.executable
    data = tmp_path / "fm"
    subprocess.run(
        [py, "-m", "mmtok", "shards", "fashion-mnist", "--out", str(data), "limit=300", "maxcount=150"],
        check=True,
        env=env,
        capture_output=True,
    )
    out = tmp_path / "run"
    cmd = [
        py,
        "-m",
        "mmtok",
        "train",
        "--config",
        str(REPO / "configs/tokenizer/pca1d_fmnist.yaml"),
        f"data.train={data}/train-*.tar",
        f"data.val={data}/test-*.tar",
        "data.batch_size=16",
        "data.shuffle_buffer=50",
        "data.num_workers=0",
        "train.steps=12",
        "train.log_every=4",
        "train.eval_every=0",
        "train.eval_batches=2",
        "train.ckpt_every=0",
        "train.progress=false",
        f"output_dir={out}",
        "task.model={num_latent_tokens: 4, width: 32, depth: 1, num_heads: 2}",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    model = hub.from_pretrained(out / "export", kind="tokenizer")
    assert model.hub_name == "pca1d_tiny_k16" and model.config.num_latent_tokens == 4
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("usage" in json.dumps(r) for r in lines) and any("psnr" in json.dumps(r) for r in lines)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_mmtok_train_deepspeed_zero2_vq(tmp_path):
    """The VQ recipe under the `deepspeed` launcher (2 CPU processes, gloo, ZeRO-2): codebook EMA
    statistics are all-reduced across ranks because the task is built inside the process group."""
    pytest.importorskip("deepspeed")
    import socket

    from mmtok.data.sources.fashion_mnist import FashionMNISTShardsConfig, build_fashion_mnist

    data = tmp_path / "fm"
    build_fashion_mnist(FashionMNISTShardsConfig(out=str(data), limit=256, maxcount=64))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        port,
        "--module",
        "mmtok.train",
        "--config",
        str(REPO / "configs/tokenizer/vq_fmnist.yaml"),
        f"deepspeed.config={REPO}/configs/ds/zero2.json",
        "deepspeed.enabled=true",
        "train.device=cpu",
        f"data.train={data}/train-*.tar",
        f"data.val={data}/test-*.tar",
        "data.batch_size=16",
        "data.num_workers=0",
        "data.shuffle_buffer=32",
        "train.steps=8",
        "train.log_every=4",
        "train.eval_every=0",
        "train.eval_batches=2",
        "train.ckpt_every=0",
        "train.progress=false",
        f"output_dir={out}",
        "task.model={image_size: 28, base_channels: 8, codebook_size: 64}",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    model = hub.from_pretrained(out / "export", kind="tokenizer")
    assert model.codebook_size == 64 and model.tokens_shape == (7, 7)

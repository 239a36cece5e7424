"""Honest tokenizer figures: evaluation sets spread over the whole split, interleaved photo shards, one
codebook-usage definition in training logs and both evaluations, and a word when inputs are upsampled."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from mmtok import registries
from mmtok.data import ShardDataset, write_shards
from mmtok.tokenizers import tasks
from mmtok.tokenizers.evaluate import evaluate_tokenizer, load_eval_images, spread_positions
from mmtok.tokenizers.quantizers import codebook_stats
from mmtok.tokenizers.tasks import ToTokenizerInput, check_upsampling, prepare_images

REPO = Path(__file__).resolve().parents[1]


def test_spread_positions_cover_the_split_evenly():
    assert spread_positions(800, 4).tolist() == [0, 200, 400, 600]
    assert spread_positions(10, 3).tolist() == [0, 3, 6]
    assert spread_positions(5, 9).tolist() == [0, 1, 2, 3, 4]  # asking for more than there is: all of it
    with pytest.raises(ValueError, match="at least one"):
        spread_positions(10, 0)


def test_eval_images_from_shards_span_the_split(tmp_path):
    # a split written one source after another (like 400 crops of one photo, then the other's):
    # 12 dark images, then 12 bright ones; the first 6 samples are all dark
    imgs = np.concatenate([np.full((12, 8, 8), 10, np.uint8), np.full((12, 8, 8), 240, np.uint8)])
    write_shards(
        ({"__key__": f"s{i:03d}", "png": imgs[i], "json": {"source": "t", "split": "val"}} for i in range(24)),
        tmp_path,
        prefix="val",
        maxcount=10,  # three shards: the sample positions run across shard boundaries
    )
    x = load_eval_images("shards", 6, shards=str(tmp_path / "val-*.tar"))
    means = x.mean(dim=(1, 2, 3))
    assert x.shape == (6, 1, 8, 8)
    assert (means < 0.2).sum() == 3 and (means > 0.8).sum() == 3, means  # both sources, in proportion
    assert load_eval_images("shards", 100, shards=str(tmp_path / "val-*.tar")).shape[0] == 24


def test_eval_images_from_fashion_mnist_span_the_split(fmnist_dir):
    from mmtok.data.sources.fashion_mnist import load_fashion_mnist

    imgs, _ = load_fashion_mnist("test")
    x = load_eval_images("fmnist", 4)
    want = torch.from_numpy(imgs[[0, 2500, 5000, 7500]].copy()).float().div(255)[:, None]
    assert torch.equal(x, want)


def test_photos_builder_interleaves_photos(tmp_path):
    summary = registries.get("shard builder").create("photos", out=str(tmp_path), crops=4, size=16)
    val = list(ShardDataset(summary["splits"]["val"]["pattern"]))  # stream order, as the engine reads val
    train = list(ShardDataset(summary["splits"]["train"]["pattern"]))
    # any prefix covers every photo: the first 2 val samples are one crop of each held-out photo
    assert [s["json"]["photo"] for s in val[:2]] == ["astronaut", "chelsea"]
    n_train = len(summary["photos"]) - 2
    assert len({s["json"]["photo"] for s in train[:n_train]}) == n_train
    # each photo still gets its crops 0..3, in order, from its own generator
    for name in ("astronaut", "chelsea"):
        assert [s["__key__"] for s in val if s["json"]["photo"] == name] == [f"val_{name}_{k:05d}" for k in range(4)]
    # the crops do not depend on which other photos share the split
    alone = registries.get("shard builder").create(
        "photos", out=str(tmp_path / "alone"), crops=4, size=16, val_photos="astronaut"
    )
    solo = list(ShardDataset(alone["splits"]["val"]["pattern"]))
    assert [s["json"]["crop"] for s in solo] == [s["json"]["crop"] for s in val if s["json"]["photo"] == "astronaut"]


def _tiny_vq(seed=0):
    torch.manual_seed(seed)
    model = registries.get("tokenizer").create(
        "vq_tiny_f4", image_size=16, base_channels=8, codebook_size=64, num_res_blocks=1
    )
    model.train()
    model(torch.rand(8, 1, 16, 16) * 2 - 1)  # k-means init
    return model.eval()


def test_evaluation_usage_counts_the_last_window_only():
    model = _tiny_vq()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(40, 1, 16, 16, generator=g)
    res = evaluate_tokenizer(model, images, fid=False, usage_window=64, batch_size=16)  # 64 = last 4 images
    codes = model.tokenize(images * 2 - 1)  # [40, 4, 4]
    want = codebook_stats(codes[-4:], 64)
    assert res["usage_assignments"] == 64 and res["usage_window"] == 64
    assert (res["usage"], res["usage_ge4"], res["perplexity"]) == (want["usage"], want["usage_ge4"], want["perplexity"])
    # more images before the same last ones leave the figure unchanged (it no longer grows with --n)
    more = torch.cat([torch.rand(60, 1, 16, 16, generator=g), images])
    res_more = evaluate_tokenizer(model, more, fid=False, usage_window=64, batch_size=16)
    assert res_more["usage"] == res["usage"] and res_more["usage_ge4"] == res["usage_ge4"]
    # whereas counting every assignment reads more codes as used
    assert codebook_stats(model.tokenize(more * 2 - 1), 64, window=10**9)["usage"] > res["usage"]


def test_in_training_evaluation_and_mmtok_eval_agree_on_usage():
    task = registries.get("task").create(
        "tokenizer", tokenizer="vq_tiny_f4", model={"image_size": 16, "base_channels": 8, "codebook_size": 64}
    )
    task.train()
    task({"image": torch.rand(8, 1, 16, 16)})  # k-means init; logs carry the same three keys
    out = task({"image": torch.rand(8, 1, 16, 16)})
    assert {"usage", "usage_ge4", "perplexity"} <= set(out)
    images = torch.rand(24, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    ev = task.evaluate([{"image": images[i : i + 8]} for i in range(0, 24, 8)])
    res = evaluate_tokenizer(task.tokenizer, images, fid=False)
    for k in ("usage", "usage_ge4", "perplexity"):
        assert ev[k] == pytest.approx(res[k]), k


def test_upsampled_inputs_are_reported(caplog):
    tasks._warned_sizes.clear()
    sample = {"__key__": "a", "image": torch.rand(3, 16, 16)}
    with caplog.at_level(logging.WARNING, logger="mmtok.tokenizers.tasks"):
        out = ToTokenizerInput(32, 3)(sample)
        ToTokenizerInput(32, 3)(sample)  # once per size and process
    assert out["image"].shape == (3, 32, 32)
    warned = [r.getMessage() for r in caplog.records if "upsampled" in r.getMessage()]
    assert len(warned) == 1 and "16x16" in warned[0] and "size=32" in warned[0], warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmtok.tokenizers.tasks"):
        ToTokenizerInput(32, 3, upsample="allow")({"image": torch.rand(3, 8, 8)})
        ToTokenizerInput(8, 3)({"image": torch.rand(3, 16, 16)})  # downsampling is not reported
        check_upsampling(32, 32, 32)
    assert not caplog.records
    with pytest.raises(ValueError, match="upsampled"):
        ToTokenizerInput(32, 3, upsample="error")(sample)
    with pytest.raises(ValueError, match="upsample must be one of"):
        registries.get("task").create("tokenizer", tokenizer="vq_tiny_f4", upsample="sometimes")
    assert prepare_images(torch.rand(1, 1, 16, 16), 32, 1).shape == (1, 1, 32, 32)  # the helper itself is silent


def test_photo_recipe_warns_about_64_px_crops(caplog, tmp_path):
    """The default photo crops (64 px) fed to the f8 photo recipe (128 px) are reported, not silently upsampled."""
    from omegaconf import OmegaConf

    tasks._warned_sizes.clear()
    recipe = OmegaConf.to_container(OmegaConf.load(REPO / "configs/tokenizer/vq_photos_f8.yaml"))
    task = registries.get("task").create("tokenizer", **{k: v for k, v in recipe["task"].items() if k != "name"})
    assert task.tokenizer.config.image_size == 128
    default_size = registries.get("shard builder").build_config("photos").size
    with caplog.at_level(logging.WARNING, logger="mmtok.tokenizers.tasks"):
        task.sample_transform("train")({"image": torch.rand(3, default_size, default_size)})
    assert any("upsampled" in r.getMessage() for r in caplog.records)


def test_photo_recipe_dead_code_settings_fit_its_batch():
    """The f8 recipe's restart settings are in hits per code and step: they only mean something next to
    its batch (tokens per step / codebook size), so a batch change that breaks them fails here."""
    from omegaconf import OmegaConf

    recipe = OmegaConf.to_container(OmegaConf.load(REPO / "configs/tokenizer/vq_photos_f8.yaml"))
    task = registries.get("task").create("tokenizer", **{k: v for k, v in recipe["task"].items() if k != "name"})
    cfg = task.tokenizer.config
    tokens_per_step = recipe["data"]["batch_size"] * (cfg.image_size // cfg.downsample) ** 2
    uniform = tokens_per_step / cfg.codebook_size
    assert cfg.codebook_size == 1024 and uniform == 4.0
    assert 0 < cfg.threshold_ema_dead_code < uniform <= cfg.reset_cluster_size
    # an unused code is found within ~10 steps (ln(uniform / threshold) / -ln(decay)), not ~70 as at 0.99
    assert np.log(uniform / cfg.threshold_ema_dead_code) / -np.log(cfg.decay) < 10
    book = task.tokenizer.quantizer.vq._codebook  # what the library layer really runs with
    assert book.decay == cfg.decay and book.reset_cluster_size == cfg.reset_cluster_size
    assert book.threshold_ema_dead_code == cfg.threshold_ema_dead_code

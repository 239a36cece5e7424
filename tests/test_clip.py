"""The ``clip`` task (open_clip's CLIP + ClipLoss on captioned scenes): captions, loss, training through the engine,
the exported open_clip folder as the MLLM's tower, ``mmtok eval clip``, and 2-process DeepSpeed ZeRO-2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from launching import free_port, short_run_args

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# a tiny tower with the segmentation model's geometry: 64 px, patch 4 -> 256 patch tokens
TINY_VISION = {"image_size": 64, "patch_size": 4, "width": 32, "layers": 2, "head_width": 16, "patch_dropout": 0.5}
TINY_TEXT = {"context_length": 40, "width": 32, "heads": 2, "layers": 1}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from mmtok.data.sources.scenes import FashionScenesConfig, build_fashion_scenes

    out = tmp_path_factory.mktemp("scenes")
    build_fashion_scenes(FashionScenesConfig(out=str(out), train=24, val=8, test=12, canvas=64, maxcount=12))
    return out


def _task(**kw):
    from mmtok.clip.tasks import ClipTask, ClipTaskConfig

    spec = {"embed_dim": 16, "vision": dict(TINY_VISION), "text": dict(TINY_TEXT), **kw}
    return ClipTask(ClipTaskConfig(**spec))


# -- captions ---------------------------------------------------------------------------------------------------
def test_caption_rule_order_and_signature():
    from mmtok.clip.captions import caption, item_phrase, items_signature, key_seed

    items = [
        {"class_name": "sneaker", "colour": "red", "position": "left"},
        {"class_name": "bag", "colour": "orange", "position": "top right"},
        {"class_name": "ankle boot", "colour": "white", "position": "center"},
    ]
    assert item_phrase(items[1]) == "an orange bag at the top right"
    assert caption(items) == (
        "a red sneaker on the left and an orange bag at the top right and a white ankle boot in the center"
    )
    seed = key_seed("test_000001")
    assert caption(items, seed) == caption(items, key_seed("test_000001"))  # the key fixes the order
    orders = {caption(items, key_seed(f"k{i}")) for i in range(40)}
    assert len(orders) == 6  # every permutation of three items shows up
    assert {items_signature(items[::-1])} == {items_signature(items)}
    with pytest.raises(KeyError, match="position"):
        item_phrase({"class_name": "bag", "colour": "red"})


def test_colour_free_captions_and_hard_negatives():
    import numpy as np

    from mmtok.clip.captions import caption, hard_negative, item_phrase

    items = [
        {"class_name": "ankle boot", "colour": "red", "position": "left"},
        {"class_name": "bag", "colour": "blue", "position": "top"},
    ]
    assert item_phrase(items[0], colour=False) == "an ankle boot on the left"
    assert caption(items, colour=False) == "an ankle boot on the left and a bag at the top"
    kinds = set()
    for i in range(40):
        wrong = hard_negative(items, np.random.default_rng(i))
        changed = [(a, b) for a, b in zip(items, wrong) if a != b]
        assert len(changed) == 1  # one item, one field
        (a, b), diff = changed[0], {k for k in changed[0][0] if changed[0][0][k] != changed[0][1][k]}
        assert diff in ({"class_name"}, {"position"}) and b["colour"] == a["colour"]
        kinds |= diff
    assert kinds == {"class_name", "position"}


def test_flip_items_recomputes_positions_from_mirrored_boxes():
    from mmtok.clip.captions import flip_items

    items = [
        {"class_name": "bag", "colour": "red", "position": "top left", "bbox": [0, 0, 16, 16]},
        {"class_name": "coat", "colour": "blue", "position": "center", "bbox": [24, 24, 40, 40]},
        # centre x = 64 on a 96 canvas: "right" (cx >= 2/3 canvas); mirrored cx = 32 = 1/3 canvas is not "left"
        {"class_name": "shirt", "colour": "cyan", "position": "right", "bbox": [56, 40, 72, 56]},
    ]
    flipped = flip_items(items[:2], 64)
    assert [it["position"] for it in flipped] == ["top right", "center"]
    assert flipped[0]["bbox"] == [48, 0, 64, 16]
    assert flip_items(items[2:], 96)[0]["position"] == "center"


def test_caption_tokenizer_pads_ends_and_refuses():
    from mmtok.clip.captions import CaptionError, CaptionTokenizer

    tok = CaptionTokenizer("builtin:fashion", context_length=12)
    ids = tok.encode("a red t-shirt on the left")
    words = tok.tokenizer.convert_ids_to_tokens(ids.tolist())
    assert words[:9] == ["a", "red", "t", "-", "shirt", "on", "the", "left", "</s>"]
    assert ids[9:].tolist() == [tok.pad_id] * 3 and tok.pad_id == 0
    with pytest.raises(CaptionError, match="photo"):
        tok.encode("a photo of a bag")
    with pytest.raises(CaptionError, match="context_length"):
        tok.encode(" and ".join(["a red bag on the left"] * 3))


# -- the task ---------------------------------------------------------------------------------------------------
def test_task_loss_is_symmetric_cross_entropy_of_the_batch():
    task = _task()
    batch = task.synthetic_batch(6)
    batch["text"] = torch.stack([task.tokenizer.encode(f"a {c} bag on the left") for c in ["red"] * 3 + ["blue"] * 3])
    torch.manual_seed(1)  # the same patches dropped in both forwards
    out = task(batch)
    torch.manual_seed(1)
    img, txt, scale = task.encode(batch["image"], batch["text"])
    logits = scale * img @ txt.T  # [6, 6]
    target = torch.arange(6)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    assert abs(float(scale.detach()) - 1 / 0.07) < 1e-3
    out["loss"].backward()
    assert task.model.visual.conv1.weight.grad.abs().sum() > 0
    assert task.model.token_embedding.weight.grad.abs().sum() > 0


def test_hard_negative_term_is_added_to_clip_loss():
    from open_clip.loss import ClipLoss

    task = _task(hard_negative_weight=0.5)
    batch = task.synthetic_batch(4)
    batch["neg_text"] = task.tokenizer([f"a red {c} on the left" for c in ("bag", "coat", "dress", "shirt")])
    torch.manual_seed(3)
    out = task(batch)
    torch.manual_seed(3)
    img, txt, scale = task.encode(batch["image"], batch["text"])
    neg = task.model.encode_text(batch["neg_text"], normalize=True)
    pair = scale * torch.stack([(img * txt).sum(-1), (img * neg).sum(-1)], 1)  # [4, 2]: caption first
    hard = -torch.log_softmax(pair, 1)[:, 0].mean()
    assert torch.allclose(out["loss"], ClipLoss()(img, txt, scale) + 0.5 * hard, atol=1e-5)
    assert torch.allclose(out["hard_neg_loss"], hard, atol=1e-5)


def test_logit_scale_is_capped():
    task = _task(max_logit_scale=20.0)
    with torch.no_grad():
        task.model.logit_scale.fill_(10.0)  # exp(10) >> 20
    _, _, scale = task.encode(*[task.synthetic_batch(2)[k] for k in ("image", "text")])
    assert float(scale.detach()) == 20.0


def test_config_errors_name_the_key():
    from mmtok.clip.tasks import ClipConfigError

    with pytest.raises(ClipConfigError, match="unknown keys"):
        _task(vision={**TINY_VISION, "depth": 2})
    with pytest.raises(ClipConfigError, match="vocab_size"):
        _task(text={**TINY_TEXT, "vocab_size": 49408})
    with pytest.raises(ClipConfigError, match="multiple"):
        _task(vision={**TINY_VISION, "patch_size": 5})


def test_sample_transform_flips_image_and_caption_together(scenes):
    from mmtok.clip.captions import caption, flip_items, items_signature, key_seed
    from mmtok.data import ShardDataset

    task = _task()
    sample = next(iter(ShardDataset(f"{scenes}/val-*.tar")))
    items = sample["json"]["items"]
    val = task.sample_transform("val")(dict(sample))
    assert val["signature"] == items_signature(items)
    assert torch.equal(val["text"], task.tokenizer.encode(caption(items, key_seed(sample["__key__"]))))
    assert torch.allclose(val["image"], sample["image"] * 2 - 1)  # mean = std = 0.5
    train_tf = task.sample_transform("train")
    grey = (sample["image"] * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True) * 2 - 1
    seen = set()
    for _ in range(40):
        out = train_tf(dict(sample))
        is_grey = bool(torch.equal(out["image"][0], out["image"][1]))
        ref = grey.expand(3, -1, -1) if is_grey else val["image"]
        flipped = torch.allclose(out["image"], ref.flip(-1), atol=1e-5)
        assert flipped or torch.allclose(out["image"], ref, atol=1e-5)
        want = flip_items(items, 64) if flipped else items
        assert out["signature"] == items_signature(want, colour=not is_grey)
        assert out["neg_text"].shape == out["text"].shape and not torch.equal(out["neg_text"], out["text"])
        words = set(task.tokenizer.tokenizer.convert_ids_to_tokens(out["text"].tolist()))
        assert bool(words & {it["colour"] for it in items}) == (not is_grey)
        seen.add((flipped, is_grey))
    assert {f for f, _ in seen} == {True, False} and {g for _, g in seen} == {True, False}


# -- training, export, tower, eval ------------------------------------------------------------------------------
def _overrides(scenes: Path, out: Path, steps: int = 3) -> list[str]:
    return short_run_args(scenes, out, steps, batch_size=8) + [
        "task.embed_dim=16",
        "task.vision=" + json.dumps(TINY_VISION).replace(" ", ""),
        "task.text=" + json.dumps(TINY_TEXT).replace(" ", ""),
    ]


@pytest.fixture(scope="module")
def export(scenes, tmp_path_factory):
    from mmtok.train.config import load_run_config
    from mmtok.train.engine import train

    out = tmp_path_factory.mktemp("clip_run")
    summary = train(load_run_config([REPO / "configs/clip/fashion_clip.yaml"], _overrides(scenes, out)))
    assert {"loss", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"} <= set(summary["eval"])
    assert summary["train"]["loss"] > 0
    return out / "export"


def test_export_is_an_open_clip_folder(export):
    import open_clip
    from safetensors.torch import load_file

    from mmtok.clip.tasks import load_clip_folder

    meta = json.loads((export / "open_clip_config.json").read_text())
    assert meta["model_cfg"]["vision_cfg"]["patch_dropout"] == 0.0  # the exported tower sees every patch
    assert meta["preprocess_cfg"]["mean"] == [0.5, 0.5, 0.5]
    model = open_clip.create_model(f"local-dir:{export}")  # open_clip's own factory
    state = load_file(str(export / "open_clip_model.safetensors"))
    assert torch.equal(model.state_dict()["visual.conv1.weight"], state["visual.conv1.weight"])
    model2, tok, _ = load_clip_folder(export)
    text = tok(["a red bag on the left"])
    assert torch.allclose(model.eval().encode_text(text), model2.encode_text(text))


def test_mllm_builds_with_the_export_as_its_tower(export):
    from mmtok import registries
    from mmtok.clip.tasks import load_clip_folder
    from mmtok.mllm import towers

    model = (
        registries.get("mllm")
        .create("llava_fashion_seg", tower={"name": "open_clip", "checkpoint": str(export)})
        .eval()
    )
    tower = model.tower
    assert (tower.image_size, tower.patch_size, tower.hidden_size) == (64, 4, 32)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats, hs = model.encode_images(images)
        patch = towers.select_features(tower, hs[-1], "patch")
    assert patch.shape == (2, 256, 32)
    assert feats.shape == (2, 256, model.config.llm["hidden_size"])
    # the tower runs the trained weights: its last block + ln_post + [CLS] projection is open_clip's image embedding
    clip = load_clip_folder(export)[0]
    with torch.no_grad():
        x = (images - 0.5) / 0.5
        own = clip.visual.ln_post(hs[-1][:, 0]) @ clip.visual.proj
        assert torch.allclose(own, clip.encode_image(x), atol=1e-5)
        assert torch.allclose(tower.preprocess(images), x, atol=1e-6)


def test_eval_cli_writes_recall_and_zero_shot(export, scenes, tmp_path, fmnist_dir, capsys):
    from mmtok.cli.main import main

    out = tmp_path / "clip.json"
    rc = main(
        ["eval", "clip", "--model", str(export), "--data", f"{scenes}/test-*.tar", "--fmnist-limit", "30",
         "--fmnist-root", fmnist_dir, "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    ret, zs, attrs = res["retrieval"], res["zero_shot"], res["attributes"]
    assert ret["n"] == 12 and zs["n"] == 30 and zs["chance"] == 0.1
    assert attrs["n"] >= 1 and attrs["chance_class"] == 0.1 and attrs["chance_colour"] == 0.125
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "chance_r1", "chance_r5", "acc", "acc_white", "acc_plain"):
        assert 0.0 <= {**ret, **zs}[key] <= 1.0
    assert ret["i2t_r5"] >= ret["i2t_r1"]
    assert "image->text" in capsys.readouterr().out
    assert main(["eval", "clip", "--model", str(tmp_path), "--data", f"{scenes}/test-*.tar"]) == 2


# -- metrics by hand --------------------------------------------------------------------------------------------
def test_retrieval_metrics_hand_cases():
    from mmtok.clip.evaluate import retrieval_chance, retrieval_metrics

    eye = torch.eye(4)
    assert retrieval_metrics(eye, eye, list("abcd"), ks=(1,)) == {"i2t_r1": 1.0, "t2i_r1": 1.0}
    # texts in reverse order: only scene 1 and 2 share a content, so image 1's best text (row 2's caption) counts
    res = retrieval_metrics(eye, eye.flip(0), ["a", "b", "b", "c"], ks=(1, 4))
    assert res == {"i2t_r1": 0.5, "t2i_r1": 0.5, "i2t_r4": 1.0, "t2i_r4": 1.0}
    # random ranking: mean over queries of (right answers / N) at k = 1
    assert retrieval_chance(["a", "a", "b", "c"], ks=(1,))["r1"] == pytest.approx((2 + 2 + 1 + 1) / 16)
    assert retrieval_chance(["a", "a", "b", "c"], ks=(4,))["r4"] == 1.0


def test_fmnist_canvas_centres_a_bright_item():
    from mmtok.clip.evaluate import BACKGROUND, fmnist_canvases

    img = torch.zeros(1, 28, 28, dtype=torch.uint8)
    img[0, 4:24, 4:24] = 255
    canv = fmnist_canvases(img.numpy(), 64)
    assert canv.shape == (1, 3, 64, 64)
    assert canv[0, :, 32, 32].min() > 0.9 and torch.allclose(canv[0, :, 0, 0], torch.tensor(BACKGROUND))
    assert torch.allclose(canv, canv.flip(-1), atol=1e-4)  # centred


@pytest.mark.parametrize(("name", "grid"), [("fashion_clip", 16), ("fashion_vqa_clip", 24)])
def test_configs_load_and_task_is_registered(name, grid):
    from mmtok import registries
    from mmtok.train.config import load_run_config

    assert "clip" in registries.get("task").list()
    cfg = load_run_config([REPO / f"configs/clip/{name}.yaml"])
    tc = cfg.task_config()
    assert tc.vision["image_size"] // tc.vision["patch_size"] == grid and cfg.train.max_seconds == 900


# -- two processes ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.deepspeed
def test_clip_on_two_processes_zero2(scenes, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero2"
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "mmtok.train",
        "--config",
        str(REPO / "configs/clip/fashion_clip.yaml"),
        *_overrides(scenes, out, steps=2),
        "data.batch_size=4",
        "deepspeed.enabled=true",
        f"deepspeed.config={REPO}/configs/ds/zero2.json",
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    env_json = json.loads((out / "env.json").read_text())
    assert env_json["backend"] == "deepspeed" and env_json["world_size"] == 2
    from mmtok.clip.tasks import load_clip_folder

    model, tok, _ = load_clip_folder(out / "export")
    assert model.encode_text(tok(["a red bag on the left"])).shape == (1, 16)

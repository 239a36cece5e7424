"""fashion-vqa shards, the stage-1/stage-2 tasks (full and LoRA), export, and `mmtok train` on the YAMLs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_fashion_mllm

from mmtok import registries
from mmtok.mllm.modeling import MLLM
from mmtok.mllm.pruning.base import Pruner, PrunerConfig
from mmtok.train.config import load_run_config

TINY = tiny_fashion_mllm("llama", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import os

    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.fail("Fashion-MNIST is missing: run `make setup`")
    out = tmp_path_factory.mktemp("fvqa")
    summary = (
        registries.get("shard builder")
        .get("fashion-vqa")
        .target(registries.get("shard builder").build_config("fashion-vqa", out=str(out), train=24, val=6, test=6))
    )
    return out, summary


def test_fashion_vqa_answers_follow_metadata(shards):
    import tarfile

    from mmtok.mllm.data import NUMBER_WORDS
    from mmtok.mllm.text import build_fashion_tokenizer

    out, summary = shards
    assert set(summary["splits"]) == {"train", "val", "test"}
    tok = build_fashion_tokenizer()
    seen = set()
    with tarfile.open(out / "train-000000.tar") as tar:
        for m in tar.getmembers():
            if not m.name.endswith(".json"):
                continue
            meta = json.load(tar.extractfile(m))
            items, q, a = meta["items"], meta["question"], meta["answer"]
            seen.add(meta["qtype"])
            if meta["qtype"] == "count":
                assert a == NUMBER_WORDS[len(items)]
            elif meta["qtype"] == "left":
                assert a == min(items, key=lambda it: it["bbox"][0] + it["bbox"][2])["class_name"]
            elif meta["qtype"] == "colour":
                cls = q[len("what colour is the ") : -2]
                assert [it["colour"] for it in items if it["class_name"] == cls] == [a]
            else:
                cls = q.split(" ", 3)[3][:-2]
                assert a == ("yes" if any(it["class_name"] == cls for it in items) else "no")
            ids = tok(q + " " + a)["input_ids"]
            assert tok.unk_token_id not in ids, q  # the closed vocabulary covers every question and answer
    assert len(seen) >= 3


def test_fashion_vqa_small_items_variant():
    """scene_canvas=48 on a 96 px canvas: items of 14-24 px inside one 48 px window placed on the canvas, bboxes in
    canvas pixels (answers still follow them), nothing item-bright outside the window; scene_canvas=0 keeps the
    default scenes exactly (same random stream)."""
    import numpy as np

    from mmtok.data.sources.scenes import make_scene, split_source
    from mmtok.mllm.data import FashionVQAConfig, vqa_samples

    small = list(vqa_samples(FashionVQAConfig(scene_canvas=48, questions_per_scene=4), "test", 12))
    assert {s["json"]["qtype"] for s in small} >= {"count", "colour", "exists"}
    for smp in small:
        rgb, meta = smp["png"], smp["json"]
        assert rgb.shape == (96, 96, 3) and meta["scene_canvas"] == 48
        boxes = np.array([it["bbox"] for it in meta["items"]])
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 96).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) <= 24).all()  # items <= 50% of the 48 px scene
        x0, y0 = boxes[:, :2].min(0)
        x1, y1 = boxes[:, 2:].max(0)
        assert x1 - x0 <= 48 and y1 - y0 <= 48
        bright = rgb.max(-1) > 90  # tinted item pixels; the background stays darker
        outside = bright.copy()
        outside[max(0, y1 - 48) : y0 + 48, max(0, x1 - 48) : x0 + 48] = False
        assert bright.any() and not outside.any()
        if meta["qtype"] == "left":
            assert meta["answer"] == min(meta["items"], key=lambda it: it["bbox"][0] + it["bbox"][2])["class_name"]
    # the default (scene_canvas=0) is unchanged: scene s of a split is make_scene on its own generator
    images, labels, fidx = split_source("test")
    first = next(vqa_samples(FashionVQAConfig(), "test", 1))
    rgb, _, _ = make_scene(np.random.default_rng([0, 7, 2, 0]), images, labels, 96, 1, 4, indices=fidx)
    np.testing.assert_array_equal(first["png"], rgb)


def test_encode_conversation_learns_every_answer():
    """Several turns: the first is the single-turn training pair, later questions carry no image, every answer
    (+ </s>) is labelled and nothing else; one turn is encode_training_pair; no chat template -> a clear error."""
    from transformers import PreTrainedTokenizerFast

    from mmtok.mllm.text import build_fashion_tokenizer, encode_conversation, encode_training_pair

    tok = build_fashion_tokenizer()
    turns = [("how many items are there ?", "two"), ("is there a bag ?", "no"), ("what colour is the dress ?", "red")]
    assert encode_conversation(tok, turns[:1]) == encode_training_pair(tok, *turns[0])
    ids, labels = encode_conversation(tok, turns)
    assert len(ids) == len(labels)
    first, _ = encode_training_pair(tok, *turns[0])
    assert ids[: len(first)] == first
    words = tok.convert_ids_to_tokens(ids)
    assert " ".join(words) == (
        "user : <image> how many items are there ? assistant : two </s> "
        "user : is there a bag ? assistant : no </s> user : what colour is the dress ? assistant : red </s>"
    )
    learnt = [w for w, lab in zip(words, labels) if lab != -100]
    assert learnt == ["two", "</s>", "no", "</s>", "red", "</s>"]
    assert all(lab in (-100, i) for i, lab in zip(ids, labels))
    assert words.count("<image>") == 1
    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="</s>")
    with pytest.raises(ValueError, match="chat template"):
        encode_conversation(plain, turns)


def test_extra_turns_ask_the_other_question_types_of_the_scene(shards):
    """task.extra_turns: train samples become conversations whose later answers follow the scene's items (other
    question types than the sample's own, the same on every read); val samples stay one question."""
    import tarfile

    from mmtok.mllm.data import questions_for
    from mmtok.mllm.tasks import extra_turns

    task = _task("mllm_stage2", extra_turns=3)
    tok = task.model.tokenizer
    out, _ = shards
    ds_batch = _batch(task, shards, n=6)
    n_answers = [int(((row != -100) & (row == tok.eos_token_id)).sum()) for row in ds_batch["labels"]]
    assert max(n_answers) >= 3 and min(n_answers) >= 2  # every scene has >= 3 question types (count, colour, exists)
    with tarfile.open(out / "train-000000.tar") as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
        keys = [m.name[: -len(".json")] for m in tar.getmembers() if m.name.endswith(".json")]
    for key, meta in zip(keys, metas):
        more = extra_turns(meta, key, 3)
        assert more == extra_turns(meta, key, 3)
        items = meta["items"]
        prefixes = {"count": "how many", "colour": "what colour", "exists": "is there", "left": "which item"}
        assert not any(q.startswith(prefixes[meta["qtype"]]) for q, _ in more)  # other types than its own
        for q, a in more:
            if q.startswith("how many"):
                assert meta["qtype"] != "count"
                assert a == questions_for(items, np.random.default_rng(0))["count"][1]
            elif q.startswith("what colour"):
                cls = q[len("what colour is the ") : -2]
                assert [it["colour"] for it in items if it["class_name"] == cls] == [a]
            elif q.startswith("is there"):
                cls = q.split(" ", 3)[3][:-2]
                assert a == ("yes" if any(it["class_name"] == cls for it in items) else "no")
            else:
                assert a == min(items, key=lambda it: it["bbox"][0] + it["bbox"][2])["class_name"]
    val = _batch(task, shards, split="val", n=4)
    assert all(int(((row != -100) & (row == tok.eos_token_id)).sum()) == 1 for row in val["labels"])
    task.train()
    loss = task(ds_batch)["loss"]
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="extra_turns"):
        _task("mllm_stage2", extra_turns=-1)


def _task(name: str, **kw):
    return registries.get("task").create(name, model="llava_fashion_small", model_overrides=TINY, **kw)


def _batch(task, shards, split="train", n=4):
    from mmtok.data import ShardDataset

    out, _ = shards
    ds = ShardDataset(str(out / f"{split}-000000.tar"), transform=task.sample_transform(split))
    samples = [s for _, s in zip(range(n), ds)]
    return task.collate(samples)


def test_stage1_trains_projector_only(shards):
    task = _task("mllm_stage1")
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.projector.") for n in trainable)
    batch = _batch(task, shards)
    out = task(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    assert task.model.projector.linear_1.weight.grad is not None
    assert task.model.llm.model.embed_tokens.weight.grad is None


def test_training_step_logits_only_at_labelled_rows_match_the_full_logits(shards):
    """The task's loss_only forward gives the full-logits loss, gradients and token accuracy."""
    task = _task("mllm_stage2")
    batch = _batch(task, shards, n=6)
    m = task.model
    full = m(batch["input_ids"], batch["images"], batch["attention_mask"], labels=batch["labels"])
    pred, tgt = full.logits[:, :-1].argmax(-1), full.labels[:, 1:]
    mask = tgt != -100
    want_acc = ((pred == tgt) & mask).sum().float() / mask.sum().float()
    got = task(batch)
    torch.testing.assert_close(got["loss"], full.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["token_acc"], want_acc)
    params = [p for p in task.parameters() if p.requires_grad]
    g_full = torch.autograd.grad(full.loss, params, allow_unused=True)
    g_fast = torch.autograd.grad(got["loss"], params, allow_unused=True)
    for a, b in zip(g_fast, g_full):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


class _Fixed(Pruner):
    """A pre-LLM pruner that keeps given indices (to replay the task's draw)."""

    def __init__(self, keep):
        super().__init__(PrunerConfig(num_keep=keep.shape[1]))
        self.keep = keep

    def select(self, ctx):
        return self.keep


def test_token_drop_trains_on_a_fresh_random_subset_per_sample(shards):
    """token_drop=1: every training batch sees K random image tokens per sample (K uniform in the range, a fresh
    subset per sample), and the loss is the model's loss under exactly that pre-LLM selection; evaluation mode
    and token_drop=0 see every token."""
    task = _task("mllm_stage2", token_drop=1.0, token_drop_keep=[5, 9])
    batch = _batch(task, shards, n=6)
    m = task.model
    n, b = m.num_image_tokens, batch["images"].shape[0]
    full = m(batch["input_ids"], batch["images"], batch["attention_mask"], labels=batch["labels"])
    task.train()
    ks = set()
    for seed in range(4):
        torch.manual_seed(seed)
        got = task(batch)
        torch.manual_seed(seed)  # replay the draws: batch coin, K, one permutation per sample
        torch.rand(())  # the batch's coin (token_drop=1: always drops)
        k = int(torch.randint(5, 10, ()))
        keep = torch.rand(b, n).argsort(dim=1)[:, :k].sort(dim=1).values
        ks.add(k)
        assert len({tuple(r) for r in keep.tolist()}) > 1  # not one subset for the whole batch
        want = m(
            batch["input_ids"], batch["images"], batch["attention_mask"], labels=batch["labels"], pruner=_Fixed(keep)
        )
        torch.testing.assert_close(got["loss"], want.loss, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got["loss"], full.loss)
    assert len(ks) > 1
    task.eval()
    torch.testing.assert_close(task(batch)["loss"], full.loss, rtol=1e-5, atol=1e-6)
    off = _task("mllm_stage2")
    off.model.load_state_dict(m.state_dict())
    off.train()
    torch.testing.assert_close(off(batch)["loss"], full.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"token_drop": 1.5}, "share of training batches"),
        ({"token_drop": 0.5, "token_drop_keep": [64]}, r"\[min, max\]"),
        ({"token_drop": 0.5, "token_drop_keep": [9, 5]}, r"\[min, max\]"),
        ({"token_drop": 0.5, "token_drop_keep": [0, 5]}, r"\[min, max\]"),
    ],
)
def test_token_drop_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _task("mllm_stage2", **kw)


def test_stage2_lora_learns_and_exports_merged(shards, tmp_path):
    task = _task("mllm_stage2", lora_rank=4)
    names = [n for n, p in task.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in names) and not any("embed_tokens" in n for n in names)
    batch = _batch(task, shards)
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(8):
        loss = task(batch)["loss"]
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first  # it fits the batch
    task.eval()
    task.export(tmp_path / "export")
    back = MLLM.from_pretrained(tmp_path / "export").eval()
    assert not any("lora_" in k for k in back.state_dict())
    with torch.no_grad():
        ref = task.model(batch["input_ids"], batch["images"], batch["attention_mask"]).logits
        got = back(batch["input_ids"], batch["images"], batch["attention_mask"]).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    metrics = task.evaluate([_batch(task, shards, "val")])
    assert 0.0 <= metrics["answer_acc"] <= 1.0 and "loss" in metrics


@pytest.mark.parametrize("cfg", ["fashion_vqa_scratch", "fashion_vqa_cpu", "llava_stage1", "llava_stage2_lora"])
def test_configs_validate(cfg):
    run = load_run_config([f"configs/mllm/{cfg}.yaml"])
    assert run.task["name"].startswith("mllm_stage")


def test_vqa_tower_export_loads_into_the_fashion_vqa_model(tmp_path):
    """configs/mllm/vqa_tower_cpu.yaml (seg_tower) exports a tower that fashion_vqa_cpu.yaml's model loads with the
    overrides its header gives (stem=conv, checkpoint=<export>): same geometry (96 px, patch 4 -> 576 tokens), and
    the MLLM's tower holds exactly the exported weights."""
    from safetensors.torch import load_file

    stage1 = load_run_config(["configs/mllm/vqa_tower_cpu.yaml"])
    export = f"{stage1.output_dir}/export"
    stage2 = load_run_config(
        ["configs/mllm/fashion_vqa_cpu.yaml"],
        ["task.model_overrides.tower.stem=conv", f"task.model_overrides.tower.checkpoint={export}"],
    )
    assert stage1.task["name"] == "seg_tower" and stage2.task["name"] == "mllm_stage2"
    assert export in Path("configs/mllm/fashion_vqa_cpu.yaml").read_text()  # the header names this export
    tower1 = dict(stage1.task["tower"])
    tower2 = dict(stage2.task["model_overrides"]["tower"])
    assert tower1["kwargs"] == tower2["kwargs"] and tower1["stem"] == tower2["stem"] == "conv"
    torch.manual_seed(0)
    task = registries.get("task").create("seg_tower", **{k: v for k, v in stage1.task.items() if k != "name"})
    task.export(tmp_path / "export")
    overrides = {**stage2.task["model_overrides"], "tower": {**tower2, "checkpoint": str(tmp_path / "export")}}
    model = registries.get("mllm").create(stage2.task["model"], **overrides)
    assert model.num_image_tokens == 576 and model.tower.config.stem == "conv"
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    mine = model.tower.model.state_dict()
    assert exported.keys() == mine.keys()
    for k, v in exported.items():
        torch.testing.assert_close(mine[k], v, rtol=0, atol=0)


def test_mmtok_train_runs_the_scratch_config(shards, tmp_path):
    from mmtok.train.engine import train

    out, _ = shards
    tiny = json.dumps(TINY).replace(" ", "")
    cfg = load_run_config(
        ["configs/mllm/fashion_vqa_scratch.yaml"],
        [
            f"data.train={out}/train-000000.tar",
            f"data.val={out}/val-000000.tar",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.resampled=false",
            "data.epoch_length=0",
            "train.steps=3",
            "train.eval_every=0",
            "train.ckpt_every=0",
            "train.progress=false",
            "optim.warmup_steps=0",
            f"output_dir={tmp_path / 'run'}",
            f"task.model_overrides={tiny}",
        ],
    )
    summary = train(cfg)
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
    model = MLLM.from_pretrained(tmp_path / "run" / "export")
    assert model.tokenizer is not None and model.num_image_tokens == 16
    assert summary is not None


# -- inputs and suite hygiene these tasks rely on -------------------------------------------------------------------
def test_folder_shards_keep_images_without_a_mask(tmp_path):
    """missing_mask=keep: the mask-less image is written *and read* (the reader skips a sample lacking a field most
    of its shard carries unless the writer declared it optional)."""
    import numpy as np
    from PIL import Image

    from mmtok.data.reader import ShardDataset

    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "img" / f"p{i}.png")
        if i < 3:  # 3 of 4 images have a mask
            Image.fromarray((np.arange(64).reshape(8, 8) % 2).astype(np.uint8)).save(tmp_path / "mask" / f"p{i}.png")
    build = registries.get("shard builder").get("folder").target
    cfg = registries.get("shard builder").build_config(
        "folder",
        out=str(tmp_path / "out"),
        images=str(tmp_path / "img"),
        masks=str(tmp_path / "mask"),
        missing_mask="keep",
    )
    assert build(cfg)["splits"]["train"]["samples"] == 4
    ds = ShardDataset(str(tmp_path / "out" / "train-*.tar"))
    samples = list(ds)
    assert sorted(s["__key__"] for s in samples) == ["p0", "p1", "p2", "p3"] and not ds.stats
    assert sum("mask" in s for s in samples) == 3  # decoded under "mask"


def test_run_config_lives_in_the_engine():
    import mmtok.train as engine
    from mmtok.train import config as run_config
    from mmtok.train import engine as loop

    assert engine.RunConfig is run_config.RunConfig and engine.load_run_config is run_config.load_run_config
    assert engine.preflight is loop.preflight
    assert load_run_config is run_config.load_run_config


def test_hypothesis_writes_outside_the_repo():
    """conftest points hypothesis' storage (examples, caches) at a temp folder: `make test` leaves the tree clean."""
    from pathlib import Path

    from hypothesis.configuration import storage_directory

    repo = Path(__file__).resolve().parents[1]
    where = storage_directory("examples", intent_to_write=False).path.resolve()
    assert repo not in where.parents, where

"""fashion-vqa shards, the stage-1/stage-2 tasks (full and LoRA), export, and `mmtok train` on the YAMLs."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_fashion_mllm

from mmtok import registries
from mmtok.config import load_run_config
from mmtok.mllm.modeling import MLLM

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

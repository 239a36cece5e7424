"""configs/mllm/fashion_vqa_from_seg.yaml: fashion-vqa as stage 2 on top of a referring-segmentation MLLM.

The recipe rests on three things, pinned here: its questions and answers (fashion-vqa at the seg model's 64 px)
tokenize without ``<unk>`` in the seg model's ``builtin:fashion-seg`` vocabulary; ``mllm_stage2`` with ``init``
loads a seg export whole (tower, projector, LLM, tokenizer), trains tower + projector + LLM and leaves the seg
heads frozen; and ``mmtok train`` on the YAML runs and exports a folder that loads back with its seg heads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from launching import short_run_args
from tiny_models import fashion_vqa_shards, tiny_seg_mllm

from mmtok import registries
from mmtok.mllm.modeling import MLLM
from mmtok.train.config import load_run_config

CONFIG = "configs/mllm/fashion_vqa_from_seg.yaml"


def test_config_is_stage2_on_the_seg_export():
    run = load_run_config([CONFIG])
    text = Path(CONFIG).read_text()
    assert run.task["name"] == "mllm_stage2" and run.task["train_tower"]
    # stage 1 is the seg recipe as it is: init reads the folder its run exports
    seg = load_run_config(["configs/mllm/seg_scenes_cpu.yaml"])
    assert run.task["init"] == f"{seg.output_dir}/export"
    assert "--config configs/mllm/seg_scenes_cpu.yaml\n" in text
    assert run.data.train.startswith("data/fashion-vqa64/") and "--out data/fashion-vqa64 canvas=64" in text
    assert f"--model {run.output_dir}/export" in text  # the header's eval command reads this run's export
    assert run.train.max_seconds == 900  # stage 2: 15 minutes after the seg recipe's 30


def test_fashion_vqa_at_64_px_speaks_the_seg_vocabulary(fmnist_dir):
    from mmtok.mllm.data import FashionVQAConfig, vqa_samples
    from mmtok.mllm.text import load_tokenizer

    tok = load_tokenizer("builtin:fashion-seg")
    samples = list(vqa_samples(FashionVQAConfig(canvas=64, questions_per_scene=4), "test", 40))
    assert {s["json"]["qtype"] for s in samples} == {"count", "left", "colour", "exists"}
    for s in samples:
        assert s["png"].shape == (64, 64, 3)
        q, a = s["json"]["question"], s["json"]["answer"]
        ids = tok(f"{q} {a}", add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, (q, a)


@pytest.fixture(scope="module")
def seg_export(tmp_path_factory):
    """An untrained tiny seg MLLM (all-mask + [SEG] heads) exported by the ``mllm_seg`` task, as stage 1 would."""
    torch.manual_seed(0)
    task = registries.get("task").create(
        "mllm_seg", model_overrides=tiny_seg_mllm(), heads={"allmask": {}, "segtoken": {"dim": 16}}, train_tower=True
    )
    out = tmp_path_factory.mktemp("seg") / "export"
    task.export(out)
    return out


def test_stage2_task_loads_the_seg_export_whole(seg_export):
    run = load_run_config([CONFIG], [f"task.init={seg_export}"])
    task = registries.get("task").create("mllm_stage2", **{k: v for k, v in run.task.items() if k != "name"})
    ref = MLLM.from_pretrained(seg_export)
    mine, theirs = task.model.state_dict(), ref.state_dict()
    assert mine.keys() == theirs.keys() and any(k.startswith("seg_heads.") for k in mine)
    for k, v in theirs.items():
        torch.testing.assert_close(mine[k], v, rtol=0, atol=0)
    assert task.model.tokenizer.get_vocab() == ref.tokenizer.get_vocab() and len(task.model.tokenizer) == 1136
    assert not any(p.requires_grad for p in task.model.seg_heads.parameters())
    for part in (task.model.tower, task.model.projector, task.model.llm):
        assert any(p.requires_grad for p in part.parameters())


def test_mmtok_train_runs_the_config_and_exports(seg_export, tmp_path, fmnist_dir):
    from mmtok.train.engine import train

    data = fashion_vqa_shards(tmp_path / "vqa32", train=16, val=4, canvas=32)  # the tiny tower's 32 px canvas
    cfg = load_run_config([CONFIG], [f"task.init={seg_export}", *short_run_args(data, tmp_path / "run", 3, 4)])
    before = MLLM.from_pretrained(seg_export).state_dict()
    train(cfg)
    model = MLLM.from_pretrained(tmp_path / "run" / "export")
    after = model.state_dict()
    assert set(model.seg_heads.keys()) == {"allmask", "segtoken"}
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"tower", "projector", "llm"} <= changed and "seg_heads" not in changed
    meta = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert meta["config"]["tokenizer"] == "."


def test_the_100k_variant_differs_only_in_its_data_and_stage_1():
    base, big = load_run_config([CONFIG]), load_run_config(["configs/mllm/fashion_vqa_from_seg100k.yaml"])
    text = Path("configs/mllm/fashion_vqa_from_seg100k.yaml").read_text()
    assert {k: v for k, v in big.task.items() if k != "init"} == {k: v for k, v in base.task.items() if k != "init"}
    # the same training settings; only the base recipe names the steps of its published figure
    same_train = dataclasses.replace(big.train, reference_steps=0) == dataclasses.replace(base.train, reference_steps=0)
    assert big.optim == base.optim and same_train and big.data.batch_size == base.data.batch_size
    assert big.data.train.startswith("data/fashion-vqa64big/")
    assert "--out data/fashion-vqa64big canvas=64 train=100000" in text and "--out data/scenes100k train=100000" in text
    # the header's stage-1 command writes the folder init reads; its eval command reads this run's export
    assert f"output_dir={Path(big.task['init']).parent}" in text and f"--model {big.output_dir}/export" in text
    assert "task.qa_share=0.3" in text and "task.model_overrides.tower.stem=patch" in text

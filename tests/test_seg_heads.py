"""MLLM segmentation heads: the all-mask attention pattern, training path = inference path, batching, pruning,
a tiny fine-tuning run per head, save/reload, errors, and the `mmtok segment` / `mmtok eval seg` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import tiny_seg_heads, tiny_seg_mllm

from mmtok import registries
from mmtok.mllm import decoder as dec
from mmtok.mllm.seg import heads as H
from mmtok.mllm.text import chat_prompt, encode_prompts

EXPRS = ["the red bag", "the blue sneaker on the left"]


def make_task(**kw):
    torch.manual_seed(0)
    return registries.get("task").create(
        "mllm_seg", model="llava_fashion_seg", model_overrides=tiny_seg_mllm(), heads=tiny_seg_heads(), **kw
    )


@pytest.fixture(scope="module")
def model():
    return make_task().model.eval()


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_bidirectional_tail_mask_matches_hand_built():
    valid = torch.tensor([[False, True, True, True, True]])
    m = dec.additive_mask(valid, 5, torch.float32, bidirectional_tail=2)
    allowed = m[0, 0] == 0
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 0],  # a padding query sees nothing valid before it
            [0, 1, 0, 0, 0],
            [0, 1, 1, 0, 0],  # the history stays causal and never sees the mask tokens
            [0, 1, 1, 1, 1],  # mask tokens: the whole history and each other, both ways
            [0, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)
    # decoding a chunk of 2 after 3 cached keys: same rows as the last two above
    chunk = dec.additive_mask(valid, 2, torch.float32, bidirectional_tail=2)
    assert torch.equal(chunk[0, 0] == 0, expected[3:])


def _training_path_scores(model, texts, images):
    tok = model.tokenizer
    n = model.num_image_tokens
    ids, att = encode_prompts(tok, texts, "cpu")
    mid = H.token_id(model, "<mask>")
    ids = torch.cat([ids, torch.full((len(texts), n), mid)], 1)
    att = torch.cat([att, torch.ones(len(texts), n, dtype=att.dtype)], 1)
    prep = model.prepare(ids, att, images)
    feats = prep.ctx.image_features
    prep.embeds = torch.cat([prep.embeds[:, :-n], prep.embeds[:, -n:] + feats], 1)
    out, _ = model._run(prep, None, use_cache=False, bidirectional_tail=n)
    return out, model.seg_heads["allmask"].logits(out.hidden[:, -n:]).sigmoid()


@torch.no_grad()
def test_allmask_cached_chunk_equals_training_path_with_padding(model):
    tok = model.tokenizer
    h = model.seg_heads["allmask"]
    texts = [chat_prompt(tok, H.question_for(e), h.answer_text(e)) for e in EXPRS]  # different lengths
    images = _images()
    scores, keep = H._patch_scores(model, h, texts, images, None)
    _, ref = _training_path_scores(model, texts, images)
    assert keep is None and scores.shape == (2, 4, 4)
    torch.testing.assert_close(scores.flatten(1), ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_mask_tokens_see_each_other_but_the_answer_never_sees_them(model):
    tok = model.tokenizer
    n = model.num_image_tokens
    texts = [chat_prompt(tok, H.question_for(EXPRS[0]), model.seg_heads["allmask"].answer_text(EXPRS[0]))]
    images = _images(1)
    base, s0 = _training_path_scores(model, texts, images)
    # perturb the LAST mask token's input: every mask token's output moves (bidirectional), the history does not
    ids, att = encode_prompts(tok, texts, "cpu")
    ids = torch.cat([ids, torch.full((1, n), H.token_id(model, "<mask>"))], 1)
    prep = model.prepare(ids, torch.ones_like(ids), images)
    feats = prep.ctx.image_features.clone()
    feats[:, -1] += 5.0
    prep.embeds = torch.cat([prep.embeds[:, :-n], prep.embeds[:, -n:] + feats], 1)
    out, _ = model._run(prep, None, use_cache=False, bidirectional_tail=n)
    assert (out.hidden[0, -n:-1] - base.hidden[0, -n:-1]).abs().amax(-1).min() > 1e-6
    torch.testing.assert_close(out.hidden[:, :-n], base.hidden[:, :-n])


@pytest.mark.parametrize("head", ["allmask", "segtoken", "text"])
@torch.no_grad()
def test_segment_is_the_same_batched_and_alone(model, head):
    images = _images()
    both = model.segment(images, EXPRS, head=head)
    for i in range(2):
        one = model.segment(images[i : i + 1], EXPRS[i : i + 1], head=head)
        assert torch.equal(one.masks[0], both.masks[i])
        torch.testing.assert_close(one.scores[0], both.scores[i], atol=1e-5, rtol=1e-5)
        if head == "text":
            assert one.text == both.text[i : i + 1] and one.repairs == both.repairs[i : i + 1]
    assert both.masks.shape == (2, 32, 32) and both.masks.dtype == torch.bool
    assert (both.text is not None) == (head == "text")


@pytest.mark.parametrize("pruner", ["random", "pool", "cls_attention", "fastv", "dart", "tome", "pitome"])
@pytest.mark.parametrize("head", ["allmask", "segtoken", "text"])
@torch.no_grad()
def test_segment_under_pruning_keeps_the_budget(model, head, pruner):
    res = model.segment(_images(), EXPRS, head=head, prune=pruner, keep=8)
    assert res.masks.shape == (2, 32, 32)
    assert res.image_keep is not None and res.image_keep.shape == (2, 8)


@pytest.mark.parametrize("refine", ["none", "bilinear", "guided"])
def test_refinements_give_masks_at_image_size(model, refine):
    res = model.segment(_images(), EXPRS, head="allmask", refine=refine)
    assert res.masks.shape == (2, 32, 32)


@pytest.mark.slow
@pytest.mark.parametrize(("head", "steps"), [("allmask", 40), ("segtoken", 40), ("text", 150)])
def test_tiny_finetuning_per_head_learns_and_outputs_parse(head, steps):
    task = make_task(head_mix={head: 1.0})
    batch = task.synthetic_batch(4)
    assert list(batch["groups"]) == [head]
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(steps):
        out = task(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    task.eval()
    g = batch["groups"][head]
    res = task.model.segment(batch["images"][g["index"]], g["phrases"], head=head, questions=g["questions"])
    gt = g["masks"].bool()
    iou = (res.masks & gt).sum() / (res.masks | gt).sum()
    # the squares sit on the 4 x 4 cell lattice, so a perfect fit has IoU 1 with every head
    assert float(iou) > 0.85, f"{head}: IoU {float(iou):.2f} on the batch it was fitted to"
    if head == "text":
        assert all("<seg>" in t for t in res.text) and res.repairs == [0] * len(res.repairs), res.text


def test_heads_survive_save_and_reload(model, tmp_path):
    from mmtok.mllm.modeling import MLLM

    model.save_pretrained(tmp_path / "seg")
    again = MLLM.from_pretrained(tmp_path / "seg").eval()
    assert list(again.seg_heads) == list(model.seg_heads)
    assert again.config.seg_heads == model.config.seg_heads
    for head in ("allmask", "segtoken", "text"):
        a, b = model.segment(_images(), EXPRS, head=head), again.segment(_images(), EXPRS, head=head)
        assert torch.equal(a.masks, b.masks)


@pytest.mark.parametrize("refine", ["bilinear", "guided"])
def test_segment_threshold_cuts_the_same_refined_scores(model, refine):
    lo = model.segment(_images(), EXPRS, head="allmask", refine=refine, threshold=0.3)
    hi = model.segment(_images(), EXPRS, head="allmask", refine=refine, threshold=0.7)
    assert torch.equal(lo.scores, hi.scores)
    assert not (hi.masks & ~lo.masks).any()  # a higher threshold keeps a subset of the pixels


def test_guided_radius_follows_the_image_one_patch_wide(model):
    """Per-patch heads refine with a window of one tower patch in the image's pixels, so a larger image of the
    same scene gets a proportionally larger window (a fixed pixel radius shrinks relative to the objects)."""
    g = H.patch_grid(model)
    small = _images(2)
    large = torch.nn.functional.interpolate(small, scale_factor=2, mode="nearest")
    assert H.guided_radius(large, g) == 2 * H.guided_radius(small, g) == 2 * round(32 / g)
    for images in (small, large):
        res = model.segment(images, EXPRS, head="allmask", refine="guided", threshold=0.4)
        want = H.refine_masks(res.scores, images, "guided", 0.4, radius=H.guided_radius(images, g))
        assert torch.equal(res.masks, want)


def test_segment_errors_say_what_to_do(model):
    with pytest.raises(ValueError, match="empty"):
        model.segment(_images(1), ["  "])
    with pytest.raises(ValueError, match="no 'bogus' head"):
        model.segment(_images(1), ["the bag"], head="bogus")
    with pytest.raises(ValueError, match="2 images but 1 expressions"):
        model.segment(_images(2), ["the bag"])
    with pytest.raises(ValueError, match="threshold must be in"):
        model.segment(_images(1), ["the bag"], threshold=1.0)
    plain = registries.get("mllm").create("llava_fashion_seg", **tiny_seg_mllm())
    with pytest.raises(ValueError, match="no segmentation heads"):
        plain.segment(_images(1), ["the bag"])


def test_task_gives_every_head_its_share_of_every_batch_and_trains_vqa_samples_too():
    task = make_task(head_mix={"allmask": 2, "segtoken": 1, "text": 1})
    tr = task.sample_transform("train")
    meta = {"expression": "the bag", "class_name": "bag"}
    samples = [
        tr(
            {
                "__key__": f"k{i}",
                "image": torch.rand(3, 32, 32),
                "mask": torch.ones(32, 32, dtype=torch.long),
                "json": meta,
            }
        )
        for i in range(12)
    ]
    vqa = {"question": "how many items are there ?", "answer": "one"}
    samples.append(tr({"__key__": "q", "image": torch.rand(3, 32, 32), "json": vqa}))
    batch = task.collate(samples)
    sizes = {k: g["index"].numel() for k, g in batch["groups"].items()}
    assert sizes == {"allmask": 6, "segtoken": 3, "text": 3, "vqa": 1}
    assert sorted(i for g in batch["groups"].values() for i in g["index"].tolist()) == list(range(13))
    n = task.model.num_image_tokens
    am = batch["groups"]["allmask"]
    assert (am["input_ids"][:, -n:] == H.token_id(task.model, "<mask>")).all() and (am["labels"][:, -n:] == -100).all()
    out = task(batch)
    assert torch.isfinite(out["loss"]) and "vqa/loss" in out
    # deterministic: the same samples give the same batch (a resumed run sees the same thing)
    again = task.collate(samples)
    assert all(torch.equal(again["groups"][k]["input_ids"], g["input_ids"]) for k, g in batch["groups"].items())
    # tiny batches: a head still gets a sample while another has two, and a missing head still runs (weight 0)
    assert sorted(task.assign_heads(3)) == ["allmask", "segtoken", "text"]
    small = task.collate(samples[:2])
    assert len(small["groups"]) == 2
    task(small)["loss"].backward()
    assert all(p.grad is not None for p in task.model.seg_heads.parameters())


def test_semantic_target_uses_class_names():
    from mmtok.mllm.seg.tasks import semantic_target

    inst = np.array([[0, 1, 1], [2, 2, 3]])
    items = [{"class_name": "bag"}, {"class_name": "sneaker"}, {"class_name": "bag"}]
    lab, names = semantic_target(inst, items)
    assert names == ["bag", "sneaker"]
    assert lab.tolist() == [[0, 1, 1], [2, 2, 1]]


def test_scene_questions_have_the_answer_the_metadata_fixes():
    from mmtok.mllm.seg.tasks import scene_question

    items = [
        {"class_name": "bag", "colour": "red", "position": "top left", "expression": "the bag"},
        {"class_name": "sneaker", "colour": "red", "position": "center", "expression": "the sneaker"},
        {"class_name": "dress", "colour": "blue", "position": "center", "expression": "the dress"},
    ]
    truth = {
        "how many items are there ?": "three",
        "what colour is the bag ?": "red",
        "what colour is the sneaker ?": "red",
        "what colour is the dress ?": "blue",
        "where is the bag ?": "top left",
        "where is the sneaker ?": "center",
        "where is the dress ?": "center",
        "what is the blue item ?": "dress",  # red is not unique: no "what is the red item ?"
        "what is at the top left ?": "bag",  # center is not unique: no "what is in the center ?"
    }
    seen = {scene_question(items, np.random.default_rng(i)) for i in range(300)}
    assert seen == set(truth.items())
    assert scene_question([], np.random.default_rng(0)) is None
    # qa_share: referring samples become grounded questions trained with the LM loss (train split only)
    task = make_task(qa_share=1.0)
    sample = {"__key__": "k", "image": torch.rand(3, 32, 32), "mask": torch.ones(32, 32, dtype=torch.long)}
    sample["json"] = {"expression": "the bag", "class_name": "bag", "items": items}
    out = task.sample_transform("train")(sample)
    assert out["vqa"] and (out["question"], out["phrase"]) in truth.items()
    assert not task.sample_transform("val")(sample)["vqa"]
    with pytest.raises(ValueError, match="qa_share"):
        make_task(qa_share=1.5)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from mmtok.data.sources.scenes import FashionScenesConfig, build_fashion_scenes

    out = tmp_path_factory.mktemp("scenes")
    build_fashion_scenes(FashionScenesConfig(out=str(out), train=8, val=4, test=6, canvas=32))
    return out


def test_cli_segment_and_eval_seg(model, scenes, tmp_path, capsys):
    from PIL import Image

    from mmtok.cli.main import main

    folder = tmp_path / "model"
    model.save_pretrained(folder)
    img = tmp_path / "scene.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(img)
    out = tmp_path / "out" / "mask.png"
    rc = main(
        [
            "segment",
            "--model",
            str(folder),
            "--image",
            str(img),
            "--expression",
            "the red bag",
            "--head",
            "text",
            "--prune",
            "dart",
            "--keep",
            "8",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "time to mask" in printed and "8 of 16 image tokens kept" in printed
    assert Image.open(out).size == (32, 32) and (out.parent / "mask.overlay.png").is_file()

    js, md, grid = tmp_path / "seg.json", tmp_path / "seg.md", tmp_path / "grid.png"
    rc = main(
        [
            "eval",
            "seg",
            "--model",
            str(folder),
            "--data",
            f"{scenes}/test-*.tar",
            "--heads",
            "allmask",
            "text",
            "--refine",
            "none",
            "bilinear",
            "--thresholds",
            "0.5",
            "0.3",
            "--prune",
            "dart",
            "--keeps",
            "8",
            "--semantic",
            "--json",
            str(js),
            "--md",
            str(md),
            "--grid",
            str(grid),
        ]
    )
    assert rc == 0
    rows = json.loads(js.read_text())["rows"]
    assert {(r["head"], r["refine"], r["threshold"], r["method"]) for r in rows} == {
        (h, r, t, "none") for h in ("allmask", "text") for r in ("none", "bilinear") for t in (0.5, 0.3)
    } | {(h, "none", 0.5, "dart") for h in ("allmask", "text")}
    assert all(0.0 <= r["ciou"] <= 1.0 and r["n"] == 6 for r in rows)
    # fashion-scenes carries instance maps: the grounding rate is scored on the scenes with two or more items
    assert all(r["grounding_n"] >= 1 and 0.0 <= r["grounding"] <= 1.0 for r in rows)
    # every grounded scene is split by what its expression needs (fashion-scenes templates)
    assert all(sum(n for _, n in r["grounding_by_kind"].values()) == r["grounding_n"] for r in rows)
    assert "| head | refine |" in md.read_text() and "grounding" in md.read_text() and grid.is_file()
    assert "semantic" in json.loads(js.read_text())


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--image", "missing.png", "--expression", "the bag"], "cannot read image"),
        (["--image", "IMG", "--expression", "   "], "empty"),
        (["--image", "IMG", "--expression", "x" * 600], "limit"),
    ],
)
def test_cli_segment_bad_input_is_one_line(model, tmp_path, capsys, args, msg):
    from PIL import Image

    from mmtok.cli.main import main

    folder = tmp_path / "model"
    model.save_pretrained(folder)
    img = tmp_path / "scene.png"
    Image.new("RGB", (32, 32)).save(img)
    args = [str(img) if a == "IMG" else a for a in args]
    assert main(["segment", "--model", str(folder), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_segment_refuses_a_folder_that_is_not_a_model(tmp_path, capsys):
    from PIL import Image

    from mmtok.cli.main import main

    img = tmp_path / "scene.png"
    Image.new("RGB", (32, 32)).save(img)
    assert main(["segment", "--model", str(tmp_path), "--image", str(img), "--expression", "the bag"]) == 2
    assert "cannot load model" in capsys.readouterr().err


def test_seg_recipe_masks_come_on_text4segs_grid():
    from mmtok.config import load_run_config

    run = load_run_config(["configs/mllm/seg_scenes_cpu.yaml"])
    kw = run.task["model_overrides"]["tower"]["kwargs"]
    for name in ("allmask", "segtoken"):  # 8 x 8 patches x 2 x 2 cells = 16 x 16
        assert kw["img_size"] // kw["patch_size"] * run.task["heads"][name]["cells"] == 16


def test_grid_targets_area_share_and_stamp_reference_rule():
    # 8 x 8 mask, 2 x 2 grid: the top-left cell full, the top-right cell a quarter covered (its top-left 2 x 2)
    m = torch.zeros(1, 8, 8, dtype=torch.long)
    m[0, :4, :4] = 1
    m[0, :2, 4:6] = 1
    assert H.grid_targets(m, 2).tolist() == [[1.0, 0.25, 0.0, 0.0]]
    # STAMP: bilinear resize (align_corners=False) samples cell centres at (1.5, 1.5), (1.5, 5.5), ...; the
    # top-left centre lies between four object pixels (value 1.0), the top-right one between rows 1-2 and columns
    # 5-6 of which only pixel (1, 5) is set (value 0.25, truncated to 0)
    ref = torch.nn.functional.interpolate(m[:, None].float(), size=(2, 2), mode="bilinear", align_corners=False)
    assert ref.flatten().tolist() == [1.0, 0.25, 0.0, 0.0]
    assert H.grid_targets(m, 2, "reference").tolist() == [[1.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="choose from"):
        H.grid_targets(m, 2, "nearest")
    with pytest.raises(ValueError, match="unknown target"):
        registries.get("task").create(
            "mllm_seg", model="llava_fashion_seg", model_overrides=tiny_seg_mllm(), heads={"allmask": {"target": "x"}}
        )


@pytest.mark.parametrize("kw", [{"token_drop": 0.5}, {"extra_turns": 2}])
def test_seg_task_rejects_answer_task_options(kw):
    """token_drop / extra_turns are answer-task options: seg refuses them rather than ignoring them."""
    with pytest.raises(ValueError, match="not supported by segmentation tasks"):
        make_task(**kw)


def test_cells_to_grid_is_a_pixel_shuffle_of_each_patch():
    # 2 x 2 patches, 2 x 2 cells each: value 10 * patch + cell lands at row 2 * patch_row + cell_row, ...
    logits = torch.tensor([[[10 * p + c for c in range(4)] for p in range(4)]], dtype=torch.float)
    grid = H.cells_to_grid(logits, 2).view(4, 4)
    assert grid.tolist() == [[0, 1, 10, 11], [2, 3, 12, 13], [20, 21, 30, 31], [22, 23, 32, 33]]
    assert torch.equal(H.cells_to_grid(logits[..., :1], 1), logits[..., 0])


@pytest.mark.parametrize("head", ["allmask", "segtoken"])
def test_cells_give_a_finer_grid_and_fit_sub_patch_edges(head):
    torch.manual_seed(0)
    task = registries.get("task").create(
        "mllm_seg",
        model="llava_fashion_seg",
        model_overrides=tiny_seg_mllm(),
        heads={head: {"cells": 2, **({"dim": 16} if head == "segtoken" else {})}},
    )
    # red squares half a patch off the 4 x 4 patch grid
    batch = task.synthetic_batch(4, shift=int(task.model.tower.image_size) // 8)
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(60):
        out = task(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    task.eval()
    g = batch["groups"][head]
    res = task.model.segment(batch["images"][g["index"]], g["phrases"], head=head, questions=g["questions"])
    assert res.scores.shape[1:] == (8, 8)  # 4 x 4 patches x 2 x 2 cells
    gt = g["masks"].bool()
    iou = float((res.masks & gt).sum() / (res.masks | gt).sum())
    # the squares' edges fall in the middle of patches: only the cells can place them
    assert iou > 0.85, f"{head}: IoU {iou:.2f} on the batch it was fitted to"
    with pytest.raises(ValueError, match="cells must be >= 1"):
        H.AllMaskHead(H.AllMaskHeadConfig(cells=0))


def test_text_head_takes_the_formats_own_options():
    """A bricks text head with a coarser box and in-box grid: the answer holds the box, the budget the grid's rows."""
    head = H.TextHead(H.TextHeadConfig(format="bricks", format_options={"box_bins": 16, "brick_grid": 8}))
    mask = np.zeros((64, 64), np.int64)
    mask[16:32, 8:40] = 1
    text = head.answer_text("the bag", mask, ["the bag"])
    assert "\n<seg>[2,4,10,8]\n" in text  # 64 px / 16 bins: x 8..40 -> bins 2..10, y 16..32 -> 4..8
    assert head.format.grid_shape == (8, 8) and head.max_new_tokens() == 64 + 12 * 8 * 2
    assert (head.format.decode(text.split("\n", 1)[1]).labels > 0).any()


def test_semantic_samples_train_the_sentence_inference_feeds():
    """A "segment every item" sample's answer names every item (as semantic_miou feeds it), not its expression."""
    task = make_task()
    mask = torch.zeros(64, 64, dtype=torch.int64)
    sem = np.zeros((64, 64), np.int64)
    sem[:32] = 1
    sample = {
        "vqa": False,
        "phrase": "the red bag",
        "class_name": "bag",
        "question": H.QUESTIONS[0].format("the red bag"),
        "mask": mask,
        "semantic": (sem, ["bag"]),
        "semantic_question": H.SEMANTIC_QUESTIONS[0],
    }
    text = task.model.tokenizer.decode(task.encode(sample, "text")["input_ids"])
    assert H.SEMANTIC_PHRASE in text and "red" not in text
    referring = task.model.tokenizer.decode(task.encode({**sample, "semantic": None}, "text")["input_ids"])
    assert "the red bag" in referring and H.SEMANTIC_PHRASE not in referring


def test_presence_term_pushes_empty_targets_to_an_empty_mask():
    """presence_weight adds BCE(max logit, any foreground): large on a confident mask for an empty target only."""
    cfg = H.AllMaskHeadConfig(presence_weight=0.5)
    head = type("Head", (), {"config": cfg})()
    logits = torch.full((2, 16), -4.0)
    logits[0, :4] = 4.0  # a confident mask on an empty target, and an empty prediction on an empty target
    target = torch.zeros(2, 16)
    out = H.mask_losses(logits, target, head)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert torch.isclose(out["presence"], bce(torch.tensor([4.0, -4.0]), torch.zeros(2)))
    plain = H.mask_losses(logits, target, type("Head", (), {"config": H.AllMaskHeadConfig()})())
    assert "presence" not in plain and torch.isclose(out["mask_loss"], plain["mask_loss"] + 0.5 * out["presence"])


def test_loss_only_logits_give_the_full_logits_loss_and_gradients():
    """seg_forward projects only the labelled rows onto the vocabulary: same loss and gradients as all rows."""
    task = make_task(head_mix={"allmask": 1, "segtoken": 1, "text": 1})
    tr = task.sample_transform("train")
    meta = {"expression": "the bag", "class_name": "bag"}
    mask = torch.zeros(32, 32, dtype=torch.long)
    mask[4:20, 8:24] = 1
    samples = [tr({"__key__": f"k{i}", "image": torch.rand(3, 32, 32), "mask": mask, "json": meta}) for i in range(6)]
    batch = task.collate(samples)
    model = task.model
    for name, group in batch["groups"].items():
        images = batch["images"][group["index"]]
        prep = model.prepare(group["input_ids"], group["attention_mask"], images, labels=group["labels"])
        tail = model.num_image_tokens if name == "allmask" else 0
        out, _ = model._run(prep, None, use_cache=False, bidirectional_tail=tail)
        full = model.lm_outputs(prep, out, tail=tail)
        fast = model.lm_outputs(prep, out, tail=tail, loss_only=True)
        assert fast.logits is None and full.logits is not None
        torch.testing.assert_close(fast.loss, full.loss, rtol=1e-5, atol=1e-6)
        g_full = torch.autograd.grad(full.loss, out.hidden, retain_graph=True)[0]
        g_fast = torch.autograd.grad(fast.loss, out.hidden)[0]
        torch.testing.assert_close(g_fast, g_full, rtol=1e-4, atol=1e-7)

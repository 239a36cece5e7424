"""The Gradio demo: discovery, every tab's handler on tiny random-init models, the API, the CLI, and a real
browser run.

The models are built from the registries with tiny configs and saved with ``save_pretrained`` into a
temporary ``runs`` folder, laid out like real runs (``<run>/export``, MAE's ``export/mae`` + ``export/encoder``,
a training checkpoint folder that must be ignored, an MLLM with segmentation heads, and symlinks that loop).
The browser test drives Debian's headless Chromium.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny_models import tiny_fashion_mllm

from mmtok import registries

pytestmark = pytest.mark.demo
gr = pytest.importorskip("gradio")

MLLM_TINY = tiny_fashion_mllm("qwen2")
N_IMAGE_TOKENS = 16  # 32 px / patch 8 -> 4 x 4
SEG_HEADS = {"allmask": {}, "text": {"grid": 4, "max_new_tokens": 24}, "segtoken": {"dim": 16}}


def tiny_seg_model():
    """The tiny fashion MLLM (Llama, 4 x 4 image tokens) with the seg tokenizer and all three segmentation heads."""
    spec = tiny_fashion_mllm("llama")
    spec["tokenizer"] = "builtin:fashion-seg"
    spec["llm"]["vocab_size"] = 1136  # the fashion-seg word list
    task = registries.get("task").create(
        "mllm_seg", model="llava_fashion_seg", model_overrides=spec, heads=dict(SEG_HEADS)
    )
    return task.model


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A runs folder with one tiny model of every kind (and folders the demo must skip)."""
    from mmtok.tokenizers.bpe import train_bpe

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("runs")
    vq = registries.get("tokenizer").create("vq_tiny_f4", image_size=32, codebook_size=64, kmeans_init=False)
    vq.save_pretrained(root / "vq" / "export")
    # a BPE vocabulary beside the VQ run's export (the demo must find and use it, not learn its own)
    codes = np.random.default_rng(0).integers(0, 4, size=(50, 8, 8))
    train_bpe(codes, 20, num_codes=64).save(root / "vq" / "bpe_vocab.json")
    titok = registries.get("tokenizer").create(
        "titok_tiny_k16", codebook_size=64, kmeans_init=False, width=32, num_heads=2
    )
    titok.save_pretrained(root / "titok" / "export")
    mae = registries.get("mim model").create("mae_micro", img_size=32, patch_size=4, in_chans=1)
    mae.save_pretrained(root / "mae" / "export" / "mae")
    mae.export_encoder(root / "mae" / "export" / "encoder")  # a ViT encoder: no pixel decoder, not shown
    mae.save_pretrained(root / "mae" / "checkpoints" / "step-00000010")  # training state: skipped
    mllm = registries.get("mllm").create("llava_fashion_small", **MLLM_TINY)
    mllm.save_pretrained(root / "mllm" / "export")
    (root / "mllm" / "notes").mkdir()
    (root / "mllm" / "notes" / "config.json").write_text(json.dumps({"hello": 1}))  # not a model folder
    tiny_seg_model().save_pretrained(root / "seg" / "export")
    # links: a loop back to the root, a second name for a run, and a loop that leaves the root and comes back
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "latest").symlink_to(root / "mllm", target_is_directory=True)
    outside = tmp_path_factory.mktemp("outside")
    (outside / "back").symlink_to(root, target_is_directory=True)
    (root / "outside").symlink_to(outside, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def demo_app(models_dir):
    from mmtok.cli.demo import load_app

    app_module = load_app()
    demo = app_module.build_demo(models_dir=str(models_dir))
    return app_module, demo, demo.mmtok_app


def _check_image(img, size=256):
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.shape == (size, size, 3), (
        None if not isinstance(img, np.ndarray) else (img.dtype, img.shape)
    )


def test_discovery_finds_each_kind_and_skips_the_rest(demo_app):
    app_module, demo, app = demo_app
    core = app_module.core
    assert isinstance(demo, gr.Blocks)
    labels = {k: [m.label for m in v] for k, v in app.models.items()}
    assert labels[core.TOKENIZER] == ["titok/export  [titok_tiny_k16]", "vq/export  [vq_tiny_f4]"]
    assert labels[core.MIM] == ["mae/export/mae  [mae_micro]"]  # not the encoder, not the checkpoint
    # an MLLM with segmentation heads is offered in the MLLM tab and in the Segment tab; the symlinks add nothing
    assert labels[core.MLLM_KIND] == ["mllm/export  [llava_fashion_small]", "seg/export  [llava_fashion_seg]"]
    assert labels[core.SEG] == ["seg/export  [llava_fashion_seg]"]


def test_discovery_follows_links_to_each_place_once(demo_app, models_dir, tmp_path):
    core = demo_app[0].core
    root = tmp_path / "runs"
    root.mkdir()
    (root / "a").symlink_to(models_dir / "vq", target_is_directory=True)  # a run kept elsewhere: followed
    (root / "b").symlink_to(models_dir / "vq", target_is_directory=True)  # the same run again: listed once
    (root / "self").symlink_to(root, target_is_directory=True)
    (root / "deep").mkdir()
    (root / "deep" / "up").symlink_to(tmp_path, target_is_directory=True)  # reaches runs/ again from above
    found = core.discover_models(root)
    assert [m.label for m in found[core.TOKENIZER]] == ["a/export  [vq_tiny_f4]"]
    assert not found[core.MLLM_KIND] and not found[core.SEG] and not found[core.MIM]


def test_tokenizer_tab(demo_app):
    app_module, _, app = demo_app
    core = app_module.core
    label = app.labels(core.TOKENIZER)[1]  # the VQ tokenizer (8 x 8 ids), with bpe_vocab.json beside it
    model = app.load(core.TOKENIZER, label)
    upload = np.random.default_rng(1).integers(0, 256, size=(40, 50, 4), dtype=np.uint8)  # RGBA, not square
    for source, upload_img in (("Fashion-MNIST", None), ("photo", None), ("fashion scene", None), ("upload", upload)):
        photo = core.photo_names()[0]
        original, recon, codes, bpe, stats = app.run_tokenizer(label, source, 3, photo, upload_img)
        for img in (original, recon, codes, bpe):
            _check_image(img)
        assert "tokens per image** 64" in stats and "after BPE" in stats and "bpe_vocab.json" in stats
        psnr = float(stats.split("**PSNR** ")[1].split(" dB")[0])
        assert math.isfinite(psnr)
        # the displayed images are 8x nearest upscales of 32 px: their MSE gives the same PSNR (up to rounding)
        mse = np.mean((original.astype(np.float64) - recon.astype(np.float64)) ** 2) / 255.0**2
        assert abs(10 * math.log10(1 / mse) - psnr) < 0.3
    # the model's own round trip: encode -> decode_indices is what the tab shows
    img = core.fashion_image(3)
    r = core.run_tokenizer(model, img)
    x = torch.nn.functional.interpolate(core.to_tensor(img), size=(32, 32), mode="bilinear", antialias=True)
    ids = model.tokenize(x * 2 - 1)
    assert np.array_equal(r.codes, ids[0].numpy()) and r.tokens == 64 and r.tokens_bpe is None
    expect = core.upscale(core.to_uint8((model.decode_indices(ids).detach() + 1) / 2))
    assert np.abs(expect.astype(int) - r.recon.astype(int)).max() <= 1


def test_tokenizer_bpe_counts_match_the_vocabulary(demo_app):
    app_module, _, app = demo_app
    core = app_module.core
    from mmtok.tokenizers.bpe import BPEVocab

    vq_label, titok_label = app.labels(core.TOKENIZER)[1], app.labels(core.TOKENIZER)[0]
    vocab = BPEVocab.load(app.models_dir / "vq" / "bpe_vocab.json")
    model = app.load(core.TOKENIZER, vq_label)
    r = core.run_tokenizer(model, core.fashion_image(5), vocab, "file")
    seq = vocab.encode_one(r.codes)
    assert r.tokens_bpe == len(seq) <= r.tokens
    owner = core.bpe_cells(vocab, seq, r.codes.shape)
    assert owner.min() == 0 and len(np.unique(owner)) == len(seq)  # every cell covered, one region per token
    assert np.array_equal(vocab.decode(seq, r.codes.shape), r.codes)
    # the 1D tokenizer has no vocabulary beside it: the demo learns 1D merges itself and says so
    _, _, codes, bpe, stats = app.run_tokenizer(titok_label, "Fashion-MNIST", 0, "", None)
    assert "tokens per image** 16" in stats and "1d merges learned here" in stats
    # 16 tokens drawn as 2 rows of 8 square cells
    assert codes.dtype == np.uint8 and codes.shape == (64, 256, 3) and bpe.shape == codes.shape


@pytest.mark.parametrize("masker", ["random", "block", "tube", "attention", "adaptive", "hard_patch"])
def test_mim_tab_every_masker(demo_app, masker):
    app_module, _, app = demo_app
    core = app_module.core
    assert masker in registries.get("masker").list()
    label = app.labels(core.MIM)[0]
    original, masked, recon, info = app.run_mim(label, "Fashion-MNIST", 0, "", None, masker, 0.75, 1)
    for img in (original, masked, recon):
        _check_image(img)
    assert "48 of 64" in info  # 8 x 8 patches, int(64 * 0.25) = 16 visible
    # MAE keeps visible patches as they are: wherever the masked view is not the grey fill, recon == original
    grey = np.all(masked == 128, axis=-1)
    visible = ~grey
    assert 0.15 < visible.mean() < 0.5
    assert np.abs(recon[visible].astype(int) - original[visible].astype(int)).max() <= 1


def test_mim_tab_bad_ratio_is_a_clear_error(demo_app):
    app_module, _, app = demo_app
    label = app.labels(app_module.core.MIM)[0]
    with pytest.raises(gr.Error, match="mask_ratio"):
        app.run_mim(label, "Fashion-MNIST", 0, "", None, "random", 0.999, 0)
    with pytest.raises(gr.Error, match="no image uploaded"):
        app.run_mim(label, "upload", 0, "", None, "random", 0.75, 0)


@pytest.mark.parametrize("pruner", registries.get("pruner").list())
def test_mllm_tab_every_pruner_keeps_the_budget(demo_app, pruner):
    app_module, _, app = demo_app
    core = app_module.core
    label = app.labels(core.MLLM_KIND)[0]
    n, canvas = app.mllm_info(label)
    assert n == N_IMAGE_TOKENS and canvas == 32
    budget = 5
    answers, overlay, timing = app.run_mllm(
        label, "fashion scene", 3, None, "how many items are there ?", pruner, budget, max_new_tokens=3, repeats=1
    )
    _check_image(overlay)
    expect = n if pruner == "none" else budget
    assert f"kept {expect} of {n}" in answers and "Answer without pruning" in answers
    assert "prefill (ms)" in timing and "speed-up" in timing
    # the glue's keep indices, checked against what the pruner itself selects
    model = app.load(core.MLLM_KIND, label)
    img = core.to_tensor(core.fashion_scene(3, canvas)[0])
    a = core.answer_with_pruning(model, img, "how many items are there ?", pruner, budget, max_new_tokens=2, repeats=1)
    assert a.kept == expect and np.all(np.diff(a.keep) > 0) and a.keep.min() >= 0 and a.keep.max() < n
    assert a.prefill_ms > 0 and a.prefill_unpruned_ms > 0 and a.answer_unpruned is not None
    if pruner == "random":  # a seeded subset: the same one the pruner's own generator gives
        want = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:budget].sort().values.numpy()
        assert np.array_equal(a.keep, want)
    centres = overlay[32::64, 32::64].reshape(n, 3).astype(int)  # 4 x 4 grid of 64-px cells: their centres
    seen = core.upscale(core.to_uint8(torch.nn.functional.interpolate(img, size=(32, 32), mode="bilinear")))
    ref = seen[32::64, 32::64].reshape(n, 3).astype(int)
    if getattr(registries.get("pruner").create(pruner, num_keep=budget), "kind", "select") == "merge":
        # mergers: every image token belongs to one of the K merged tokens; merged groups are tinted, lone ones not
        assert a.groups is not None and a.groups.shape == (n,) and set(a.groups.tolist()) == set(range(budget))
        alone = np.bincount(a.groups)[a.groups] == 1
        assert np.abs(centres[alone] - ref[alone]).max(initial=0) <= 1
        assert np.abs(centres[~alone] - ref[~alone]).max() > 10
        return
    assert a.groups is None
    # the overlay dims exactly the dropped patch cells
    kept = np.zeros(n, bool)
    kept[a.keep] = True
    assert np.abs(centres[kept] - ref[kept]).max() <= 1
    assert np.all(centres[~kept] <= ref[~kept] * 0.25 + 21)


def test_mllm_tab_scene_and_errors(demo_app):
    app_module, _, app = demo_app
    label = app.labels(app_module.core.MLLM_KIND)[0]
    img, question_update, truth = app.scene(label, 4)
    _check_image(img)
    assert question_update["choices"] and "how many items are there ?" in str(question_update["choices"])
    assert "Expected answers" in truth
    with pytest.raises(gr.Error, match="type a question"):
        app.run_mllm(label, "fashion scene", 0, None, "  ", "dart", 4, max_new_tokens=2, repeats=1)
    with pytest.raises(gr.Error, match="no image uploaded"):
        app.run_mllm(label, "upload", 0, None, "how many items are there ?", "dart", 4, max_new_tokens=2, repeats=1)


@pytest.mark.parametrize("head", list(SEG_HEADS))
def test_segment_tab_every_head(demo_app, head):
    app_module, _, app = demo_app
    core = app_module.core
    label = app.labels(core.SEG)[0]
    model = app.load(core.SEG, label)
    assert sorted(core.seg_heads(model)) == sorted(SEG_HEADS) and model.num_image_tokens == N_IMAGE_TOKENS
    img, items = core.seg_scene(model, 3)
    assert img.shape == (32, 32, 3)  # drawn at the tower's resolution
    expr = items[0]["expression"]
    r = core.run_segment(model, img, expr, head, "dart", 5, "bilinear")
    assert r.head == head and r.mask.shape == (32, 32) and r.mask.dtype == bool and r.scores.shape == (4, 4)
    assert r.kept == 5 and r.num_image_tokens == N_IMAGE_TOKENS and r.seconds > 0
    _check_image(r.overlay)
    _check_image(r.mask_image)
    # the same call straight to the library gives the same mask (the demo adds nothing to the computation)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    want = model.segment(x, [expr], head=head, prune="dart", keep=5, refine="bilinear")
    assert np.array_equal(r.mask, want.masks[0].numpy()) and want.image_keep.shape == (1, 5)
    if head == "text":
        assert r.text == want.text[0] and 0 < r.tokens <= SEG_HEADS["text"]["max_new_tokens"] and r.repairs >= 0
    else:
        assert r.text is None and r.tokens == 0 and r.repairs == 0
    # the displayed images are 8x nearest upscales: tinted exactly where the mask is, untouched elsewhere
    big = np.kron(r.mask, np.ones((8, 8), bool))
    seen = core.upscale(img)
    assert np.array_equal(r.overlay[~big], seen[~big])
    tinted = seen[big].astype(float) * 0.5 + np.array(core.MASK_COLOUR) * 0.5
    assert np.abs(r.overlay[big].astype(float) - tinted).max(initial=0) <= 1
    inner = (slice(2, -2), slice(2, -2))  # inside the grey frame
    assert np.array_equal(r.mask_image[inner][..., 0] == 255, big[inner])
    # the handler lays the same result out: image, overlay, mask, descriptor text, one summary line
    shown, overlay, mask, text, summary = app.run_segment(label, "fashion scene", 3, None, expr, head, "dart", 5)
    _check_image(shown)
    assert np.array_equal(overlay, r.overlay) and np.array_equal(mask, r.mask_image)
    assert "kept 5 of 16" in summary and "ms" in summary and "decode repairs" in summary
    assert (text == r.text) if head == "text" else "writes no descriptors" in text


def test_segment_tab_pruners_refinements_and_uploads(demo_app):
    app_module, _, app = demo_app
    core = app_module.core
    model = app.load(core.SEG, app.labels(core.SEG)[0])
    img, items = core.seg_scene(model, 1)
    expr = items[0]["expression"]
    assert core.run_segment(model, img, expr, "allmask", "none", 5).kept == N_IMAGE_TOKENS  # no pruner: all kept
    assert core.run_segment(model, img, expr, "allmask", "random", 100).kept == N_IMAGE_TOKENS  # clamped to N
    assert core.run_segment(model, img, expr, "segtoken", "fastv", 1).kept == 1
    for refine in core.refine_names():
        assert core.run_segment(model, img, expr, "allmask", "none", 5, refine).mask.shape == (32, 32)
    # uploads keep their aspect ratio (RGBA and grey accepted); large ones are capped at 256 px on the long side
    rgba = np.random.default_rng(0).integers(0, 256, size=(40, 50, 4), dtype=np.uint8)
    r = core.run_segment(model, rgba, "the bag", "allmask", "dart", 4)
    assert r.mask.shape == (40, 50) and r.overlay.shape == (205, 256, 3) and r.kept == 4
    grey = np.random.default_rng(1).integers(0, 256, size=(300, 600), dtype=np.uint8)
    r = core.run_segment(model, grey, "the bag", "segtoken", "none", 4)
    assert r.mask.shape == (128, 256) and r.overlay.shape == (128, 256, 3)


def test_segment_tab_scene_and_bad_input(demo_app):
    app_module, _, app = demo_app
    core = app_module.core
    label = app.labels(core.SEG)[0]
    model = app.load(core.SEG, label)
    img, expr, md = app.seg_scene(label, 2)
    _, items = core.seg_scene(model, 2)
    _check_image(img)
    assert expr == items[0]["expression"] and expr in md
    head_update, keep_update = app.seg_model_changed(label, "segtoken", 40)
    assert sorted(head_update["choices"]) == sorted(SEG_HEADS) and head_update["value"] == "segtoken"
    assert keep_update["maximum"] == N_IMAGE_TOKENS and keep_update["value"] == N_IMAGE_TOKENS
    scene = core.seg_scene(model, 0)[0]
    for expression in ("", "   "):
        with pytest.raises(core.DemoError, match="type what to segment"):
            core.run_segment(model, scene, expression, "allmask")
    with pytest.raises(core.DemoError, match="no 'box' head"):
        core.run_segment(model, scene, "the bag", "box")
    with pytest.raises(core.DemoError, match="unknown refinement"):
        core.run_segment(model, scene, "the bag", "allmask", refine="sharp")
    with pytest.raises(core.DemoError, match="unknown pruner"):
        core.run_segment(model, scene, "the bag", "allmask", "best")
    plain = app.load(core.MLLM_KIND, app.labels(core.MLLM_KIND)[0])
    with pytest.raises(core.DemoError, match="no segmentation heads"):
        core.run_segment(plain, scene, "the bag")
    # through the handlers the same messages become gr.Error, which the page shows with the message
    with pytest.raises(gr.Error, match="type what to segment"):
        app.run_segment(label, "fashion scene", 0, None, " ", "text", "none", 4)
    with pytest.raises(gr.Error, match="no image uploaded"):
        app.run_segment(label, "upload", 0, None, "the bag", "allmask", "none", 4)
    with pytest.raises(gr.Error, match="unknown seg model folder 'nope'"):
        app.run_segment("nope", "fashion scene", 0, None, "the bag")


def test_api_endpoints_are_named_with_defaults(demo_app):
    """Each tab is one named endpoint whose parameters all have defaults and whose outputs have names."""
    _, demo, _ = demo_app
    info = demo.get_api_info()
    assert set(info["named_endpoints"]) == {"/reconstruct", "/mask", "/answer", "/segment"}
    assert not info["unnamed_endpoints"]
    for name, endpoint in info["named_endpoints"].items():
        missing = [p["parameter_name"] for p in endpoint["parameters"] if not p["parameter_has_default"]]
        assert not missing, (name, missing)
        unnamed = [r["label"] for r in endpoint["returns"] if not r["label"] or r["label"].startswith("value_")]
        assert not unnamed, (name, unnamed)
    seg = info["named_endpoints"]["/segment"]
    assert [p["parameter_name"] for p in seg["parameters"]] == [
        "model_folder", "source", "seed", "upload", "expression", "head", "pruner", "keep", "refine"
    ]  # fmt: skip
    # the UI's helpers exist but are private (not callable through gradio_client)
    helpers = [fn for fn in demo.fns.values() if fn.api_visibility != "public"]
    assert helpers and all(fn.api_visibility == "private" for fn in helpers)


def test_empty_models_folder_says_how_to_train(tmp_path):
    from mmtok.cli.demo import load_app

    demo = load_app().build_demo(models_dir=str(tmp_path / "nothing-here"))
    texts = [getattr(b, "value", "") or "" for b in demo.blocks.values() if isinstance(b, gr.Markdown)]
    joined = "\n".join(str(t) for t in texts)
    for recipe in (
        "configs/tokenizer/vq_fmnist.yaml",
        "configs/mim/mae_fmnist.yaml",
        "configs/mllm/fashion_vqa_scratch.yaml",
        "configs/mllm/seg_scenes_cpu.yaml",
    ):
        assert f"mmtok train --config {recipe}" in joined


def test_cli_defaults_to_localhost(models_dir, monkeypatch):
    from mmtok.cli import demo as cli
    from mmtok.cli.main import main

    app_module = cli.load_app()
    calls = []
    monkeypatch.setattr(app_module, "launch", lambda demo, host, port, block: calls.append((demo, host, port, block)))
    assert main(["demo", "--models", str(models_dir), "--port", "7999"]) == 0
    demo, host, port, block = calls[0]
    assert host == "127.0.0.1" and port == 7999 and block and len(demo.mmtok_app.models["mllm"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0


def test_cli_device_flag_places_the_models_and_refuses_bad_names(models_dir, monkeypatch, capsys):
    """--device auto | cpu | cuda | cuda:N: models move there and the handlers' inputs follow; a bad name, or CUDA
    where torch sees none, is one line on stderr and exit status 2 before any model loads."""
    from mmtok.cli import demo as cli
    from mmtok.cli.main import main

    app_module = cli.load_app()
    calls = []
    monkeypatch.setattr(app_module, "launch", lambda demo, host, port, block: calls.append(demo))
    assert main(["demo", "--models", str(models_dir), "--device", "cpu"]) == 0
    app = calls[-1].mmtok_app
    assert app.device == torch.device("cpu") and "(CPU)" in capsys.readouterr().out
    mllm = app.load("mllm", None)
    assert all(p.device.type == "cpu" for p in mllm.parameters())
    answers, _, timing = app.run_mllm(None, "fashion scene", 0, None, "how many items are there ?", "random", 4, 2, 1)
    assert "kept 4 of" in answers and "CPU)" in timing
    auto = app_module.resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    bad = ["gpu", "cuda:x", "tpu:0"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:1"])
    for name in bad:
        calls.clear()
        assert main(["demo", "--models", str(models_dir), "--device", name]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("mmtok demo: device") and "\n" not in err and "cpu" in err, err
        assert not calls
    if torch.cuda.is_available():  # on a GPU machine: the models and the handlers' inputs on the GPU
        gpu = app_module.DemoApp(models_dir, "cuda")
        answers, _, timing = gpu.run_mllm(None, "fashion scene", 0, None, "how many items are there ?", "random", 4)
        assert next(gpu.load("mllm", None).parameters()).is_cuda and "CUDA:0" in timing


def test_gradio_client_calls_every_endpoint_with_its_defaults(demo_app):
    """What a ``gradio_client`` user does: call each endpoint with no arguments; the helpers are not reachable."""
    client_mod = pytest.importorskip("gradio_client")
    app_module, demo, _ = demo_app
    port = app_module.load_sibling("browser").free_port()
    app_module.launch(demo, "127.0.0.1", port, block=False, quiet=True)
    try:
        client = client_mod.Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        assert "PSNR" in client.predict(api_name="/reconstruct")[-1]
        assert "patches hidden" in client.predict(api_name="/mask")[-1]
        answers, _, timing = client.predict(api_name="/answer")
        assert "kept 4 of 16" in answers and "prefill" in timing  # dart at a quarter of the tokens
        *images, text, summary = client.predict(api_name="/segment")
        assert len(images) == 3 and "kept 16 of 16" in summary  # no pruner by default
        with pytest.raises(ValueError, match="seg_scene"):
            client.predict("seg/export  [llava_fashion_seg]", 1, api_name="/seg_scene")
    finally:
        demo.close()


@pytest.mark.browser  # about 10 s on an idle 2-core machine (under a minute under heavy load): not marked slow
def test_browser_click_through(demo_app, tmp_path):
    """Serve the demo on 127.0.0.1, drive headless Chromium through three tabs, assert on the page, screenshot."""
    app_module, demo, _ = demo_app
    browser = app_module.load_sibling("browser")
    reason = browser.missing_browser()
    if reason:
        pytest.skip(f"no headless browser: {reason}")
    port = browser.free_port()
    app_module.launch(demo, "127.0.0.1", port, block=False, quiet=True)
    try:
        with browser.Browser(1400, 1100, profile_dir=tmp_path / "chromium-profile") as b:
            b.open(f"http://127.0.0.1:{port}/")
            body = b.driver.find_element("tag name", "body").text
            for title in ("Tokenizer", "Masked modeling", "MLLM + pruning", "Segment"):
                assert title in body
            # tab 1: reconstruct the default Fashion-MNIST image, wait for the output image and the stats
            assert b.image_src("tok-recon") == ""
            b.click("tok-run")
            assert b.wait_image("tok-recon", timeout=120).startswith(("http", "data:"))
            stats = b.wait_text("tok-stats", "PSNR", timeout=60)
            assert "tokens per image" in stats and "dB" in stats
            _captions_clear(b, ["tok-original", "tok-recon", "tok-codes", "tok-bpe"])
            b.screenshot(tmp_path / "tokenizer.png")
            # tab 3: pick the random pruner and a budget of 6, answer, check the kept count and timing table
            b.click_tab("MLLM + pruning")
            _set_dropdown(b, "mllm-pruner", "random")
            _set_number(b, "mllm-budget", 6)
            b.click("mllm-run")
            b.wait_image("mllm-overlay", timeout=120)
            answer = b.wait_text("mllm-answer", "kept 6 of 16", timeout=120)
            assert "Answer with random" in answer
            assert "prefill (ms)" in b.wait_text("mllm-timing", "prefill", timeout=30)
            _captions_clear(b, ["mllm-scene", "mllm-overlay"])
            _shows_whole_value(b, "mllm-model", "mllm/export  [llava_fashion_small]")
            shot = b.screenshot(tmp_path / "mllm.png")
            assert shot.stat().st_size > 10_000
            # tab 4: the text head with DART keeping 6 image tokens: overlay, mask, descriptors, the summary line
            b.click_tab("Segment")
            _shows_whole_value(b, "seg-model", "seg/export  [llava_fashion_seg]")
            assert _text_value(b, "seg-expression").startswith("the ")  # the scene's first item
            _set_radio(b, "seg-head", "text")
            _set_dropdown(b, "seg-pruner", "dart")
            _set_number(b, "seg-keep", 6)
            b.click("seg-run")
            b.wait_image("seg-overlay", timeout=120)
            b.wait_image("seg-mask", timeout=30)
            summary = b.wait_text("seg-stats", "kept 6 of 16", timeout=120)
            assert "text head" in summary and "ms" in summary and "decode repairs" in summary
            descriptors = b.wait(lambda d: _text_value(b, "seg-text"), 30, "descriptor text")
            assert "writes no descriptors" not in descriptors
            _captions_clear(b, ["seg-scene", "seg-overlay", "seg-mask"])
            b.screenshot(tmp_path / "segment.png")
            # bad input: the page shows the demo's own message, not Gradio's bare "Error"
            _set_text(b, "seg-expression", "")
            b.click("seg-run")
            b.wait(lambda d: "type what to segment" in d.find_element("tag name", "body").text, 60, "the message")
            # offline: every resource the page loaded came from the demo's own server
            urls = b.driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
            local = (f"http://127.0.0.1:{port}", "data:", "blob:")
            assert urls and not [u for u in urls if not u.startswith(local)]
    finally:
        demo.close()


def _captions_clear(b, elem_ids: list[str]) -> None:
    """Each output image's caption sits above the image, and no Gradio label floats over it."""
    for elem_id in elem_ids:
        assert not [e for e in b.css(f"#{elem_id} [data-testid='block-label']") if e.is_displayed()], elem_id
        caption = b.css(f"#{elem_id}-caption")[0].rect
        img = b.wait(lambda d, sel=f"#{elem_id} img": b.css(sel)[0], 30, f"#{elem_id} img").rect
        assert caption["y"] + caption["height"] <= img["y"] + 1, (elem_id, caption, img)


def _shows_whole_value(b, elem_id: str, value: str) -> None:
    """A dropdown shows ``value`` in full: the text, in the box's font, ends before the arrow icon starts."""
    box = b.wait(lambda d: d.find_element("css selector", f"#{elem_id} input"), 30, f"#{elem_id} input")
    assert box.get_attribute("value") == value
    text_end, room_end = b.driver.execute_script(
        """const box = arguments[0], style = getComputedStyle(box), r = box.getBoundingClientRect();
        const ctx = document.createElement('canvas').getContext('2d');
        ctx.font = style.font;
        const icon = box.parentElement.querySelector('.icon-wrap');
        const end = icon ? Math.min(icon.getBoundingClientRect().left, r.right) : r.right;
        return [r.left + parseFloat(style.paddingLeft) + ctx.measureText(box.value).width, end];""",
        box,
    )
    assert text_end <= room_end, (elem_id, value, text_end, room_end)


def _text_value(b, elem_id: str) -> str:
    boxes = b.css(f"#{elem_id} textarea") or b.css(f"#{elem_id} input")
    return boxes[0].get_attribute("value") if boxes else ""


def _set_text(b, elem_id: str, value: str) -> None:
    """Replace the text of a Gradio textbox."""
    from selenium.webdriver.common.keys import Keys

    box = b.wait(lambda d: (b.css(f"#{elem_id} textarea") or b.css(f"#{elem_id} input"))[0], 30, f"#{elem_id}")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    if value:
        box.send_keys(value)
    b.wait(lambda d: box.get_attribute("value") == value, 30, f"#{elem_id} = {value!r}")


def _set_radio(b, elem_id: str, value: str) -> None:
    """Pick the choice ``value`` of a Gradio radio group."""

    def choice(d):
        return next((e for e in b.css(f"#{elem_id} label") if e.text.strip() == value), None)

    b.wait(choice, 30, f"#{elem_id} choice {value!r}").click()
    b.wait(lambda d: choice(d).find_element("css selector", "input").is_selected(), 30, f"#{elem_id} = {value!r}")


def _set_dropdown(b, elem_id: str, value: str) -> None:
    """Choose ``value`` in a Gradio dropdown by typing it and picking the matching option."""
    from selenium.webdriver.common.keys import Keys

    box = b.wait(lambda d: d.find_element("css selector", f"#{elem_id} input"), 30, f"#{elem_id} input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(value)
    option = b.wait(
        lambda d: d.find_element("css selector", f"li[role='option'][aria-label='{value}']"), 30, f"option {value!r}"
    )
    option.click()
    b.wait(lambda d: box.get_attribute("value") == value, 30, f"#{elem_id} = {value!r}")


def _set_number(b, elem_id: str, value: int) -> None:
    """Type ``value`` into the number box of a Gradio slider (and commit it with Enter)."""
    from selenium.webdriver.common.keys import Keys

    box = b.wait(lambda d: d.find_element("css selector", f"#{elem_id} input[type='number']"), 30, f"#{elem_id}")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.ENTER)
    b.wait(lambda d: box.get_attribute("value") == str(value), 30, f"#{elem_id} = {value}")

"""The mmtok Gradio demo: visual tokenizers, masked image modeling, and an MLLM with visual-token pruning.

    mmtok demo --models runs            # http://127.0.0.1:7860

``build_demo(models_dir)`` finds every model folder under ``models_dir`` (``config.json`` written by
``mmtok.hub.save_pretrained``) and offers one tab per kind:

1. Tokenizer: original vs reconstruction, PSNR, tokens per image (and after 2D BPE), colour-coded code ids.
2. Masked modeling: an MAE, any registered masker and a mask ratio; original / masked / reconstruction.
3. MLLM + pruning: a fashion scene (or an upload), a question, any registered pruner and a keep budget; the
   answers with and without pruning, which image tokens were kept, and both prefill times.

A kind with no model folder gets a tab that says which ``mmtok train`` command makes one. Models load once
(CPU) and are cached. Nothing is downloaded: Gradio's telemetry and version check are off, and the theme
uses system fonts only (the default theme would make the browser fetch web fonts).

The computations live in ``demo/core.py`` (no Gradio there, so tests call them directly); this file is the
layout. ``demo/`` is deliberately not a package (a top-level ``demo`` would shadow other modules): this file
is loaded by path (``mmtok demo`` does so) and loads its siblings by path under ``mmtok_demo_*`` names.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gradio as gr  # noqa: E402  (after the environment switches above)
import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402

logger = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent


def load_sibling(name: str) -> Any:
    """Import ``demo/<name>.py`` by path as module ``mmtok_demo_<name>`` (once)."""
    full = f"mmtok_demo_{name}"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module  # registered first: dataclasses look their module up while the file runs
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except BaseException:
            sys.modules.pop(full, None)
            raise
    return sys.modules[full]


core = load_sibling("core")

TAB_TITLES = {core.TOKENIZER: "Tokenizer", core.MIM: "Masked modeling", core.MLLM_KIND: "MLLM + pruning"}
NO_MODEL = "No {what} was found under `{root}`. Train one, then restart the demo:\n\n```bash\n{how}\n```"
CSS = """
.mmtok-stats {font-variant-numeric: tabular-nums;}
footer {display: none !important;}
"""


def theme() -> gr.themes.Base:
    """The default theme with system fonts (the stock fonts would be fetched by the browser)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


class DemoApp:
    """State and event handlers of the demo: found models, the model cache, one ``run_*`` method per tab.

    The ``run_*`` methods take and return exactly what the UI components hold, so tests call them directly.
    """

    def __init__(self, models_dir: str | os.PathLike = "runs"):
        self.models_dir = Path(models_dir)
        self.models = core.discover_models(self.models_dir)
        self.cache = core.ModelCache()
        self._bpe: dict[tuple[str, int], tuple[Any, str]] = {}  # (label, id of the loaded model) -> vocabulary

    # -- helpers ------------------------------------------------------------------------------------------
    def labels(self, kind: str) -> list[str]:
        return [m.label for m in self.models[kind]]

    def folder(self, kind: str, label: str | None) -> Any:
        for m in self.models[kind]:
            if m.label == label:
                return m
        if not label and self.models[kind]:
            return self.models[kind][0]
        raise gr.Error(f"unknown {kind} folder {label!r}; pick one from the list")

    def load(self, kind: str, label: str | None) -> Any:
        return self.cache.get(self.folder(kind, label))

    def bpe_for(self, label: str, model: Any) -> tuple[Any, str]:
        """The tokenizer's BPE vocabulary (a file beside it, else merges learned here once) and its origin."""
        key = (label, id(model))  # a retrained (reloaded) tokenizer gets fresh merges
        if key not in self._bpe:
            from mmtok.tokenizers.bpe import BPEVocab

            folder = self.folder(core.TOKENIZER, label)
            path = core.find_bpe_vocab(folder.path, model.codebook_size)
            if path is not None:
                self._bpe[key] = (BPEVocab.load(path), f"vocabulary `{path.name}` beside the model")
            else:
                vocab = core.learn_bpe(model)
                how = f"{vocab.num_merges} {vocab.mode} merges learned here on 256 Fashion-MNIST training images"
                self._bpe[key] = (vocab, f"{how} (no `mmtok-bpe` vocabulary file beside the model)")
        return self._bpe[key]

    @staticmethod
    def _image(source: str, index: Any, photo: str, upload: Any, canvas: int = 96) -> Any:
        try:
            return core.pick_image(source, index, photo, upload, canvas)
        except core.DemoError as e:
            raise gr.Error(str(e)) from e

    # -- tab 1 --------------------------------------------------------------------------------------------
    def run_tokenizer(self, label: str, source: str, index: Any, photo: str, upload: Any, use_bpe: bool = True):
        """-> (original, reconstruction, code-id map, BPE map or None, stats markdown)."""
        model = self.load(core.TOKENIZER, label)
        img = self._image(source, index, photo, upload)
        bpe, origin = self.bpe_for(label, model) if use_bpe else (None, "")
        r = core.run_tokenizer(model, img, bpe, origin)
        cfg = model.config
        shape = " x ".join(str(s) for s in r.codes.shape)
        lines = [
            f"**PSNR** {r.psnr:.2f} dB &nbsp; **tokens per image** {r.tokens} ({shape} ids from "
            f"{model.codebook_size} codes)",
            f"input {cfg.image_size} x {cfg.image_size} px, {cfg.in_channels} channel(s); "
            f"entry `{self.folder(core.TOKENIZER, label).name}`",
        ]
        if r.tokens_bpe is not None:
            saved = 100.0 * (1 - r.tokens_bpe / max(int(np.prod(model.tokens_shape)), 1))
            lines.append(f"**after BPE** {r.tokens_bpe} tokens ({saved:.0f}% fewer); {r.bpe_source}")
        return r.original, r.recon, r.code_map, r.bpe_map, "\n\n".join(lines)

    # -- tab 2 --------------------------------------------------------------------------------------------
    def run_mim(
        self, label: str, source: str, index: Any, photo: str, upload: Any, masker: str, ratio: float, seed: Any = 0
    ):
        """-> (original, masked, reconstruction, info markdown)."""
        model = self.load(core.MIM, label)
        img = self._image(source, index, photo, upload)
        try:
            r = core.run_masking(model, img, masker, float(ratio), int(seed or 0))
        except core.DemoError as e:
            raise gr.Error(str(e)) from e
        info = f"**{r.hidden} of {r.total}** patches hidden ({masker}, ratio {float(ratio):.2f})"
        return r.original, r.masked, r.recon, info + (f"\n\n{r.note}" if r.note else "")

    # -- tab 3 --------------------------------------------------------------------------------------------
    def mllm_info(self, label: str) -> tuple[int, int]:
        """``(image tokens N, tower resolution)`` of an MLLM."""
        model = self.load(core.MLLM_KIND, label)
        return model.num_image_tokens, model.tower.image_size

    def scene(self, label: str, seed: Any):
        """-> (scene image, question dropdown update, ground-truth markdown) for scene ``seed``."""
        from mmtok.mllm.data import questions_for

        _, canvas = self.mllm_info(label) if self.models[core.MLLM_KIND] else (0, 96)
        img, items = core.fashion_scene(int(seed or 0), canvas)
        qs = questions_for(items, np.random.default_rng(int(seed or 0)))
        choices = [q for q, _ in qs.values()]
        truth = "; ".join(f"{q} → **{a}**" for q, a in qs.values())
        desc = ", ".join(it["expression"].removeprefix("the ") for it in items)
        md = f"Scene {int(seed or 0)}: {len(items)} item(s): {desc}.\n\nExpected answers: {truth}"
        return core.upscale(img), gr.update(choices=choices, value=choices[0]), md

    def run_mllm(
        self,
        label: str,
        source: str,
        seed: Any,
        upload: Any,
        question: str,
        pruner: str,
        budget: Any,
        max_new_tokens: int = 16,
        repeats: int = 3,
    ):
        """-> (answers markdown, kept-token overlay, timing markdown)."""
        model = self.load(core.MLLM_KIND, label)
        n, canvas = model.num_image_tokens, model.tower.image_size
        if source == "upload":
            img = self._image("upload", 0, "", upload)
        else:
            img = core.fashion_scene(int(seed or 0), canvas)[0]
        x = core.to_tensor(img)
        try:
            a = core.answer_with_pruning(
                model, x, question, pruner, int(budget or n), max_new_tokens=max_new_tokens, repeats=repeats
            )
        except core.DemoError as e:
            raise gr.Error(str(e)) from e
        seen = core.to_uint8(F.interpolate(x, size=(canvas, canvas), mode="bilinear"))
        prefix = n - model.tower.num_patches  # [CLS] kept as an image token when feature_select is cls_patch
        overlay = core.keep_overlay(seen, a.keep, model.tower.num_patches, prefix)
        where = f"LLM layer {a.layer}" if a.stage == "in_llm" else "before the LLM"
        answers = (
            f"**Answer with {pruner}:** {a.answer or '(empty)'}\n\n"
            f"**Answer without pruning:** {a.answer_unpruned or '(empty)'}\n\n"
            f"**kept {a.kept} of {n}** image tokens ({where})"
        )
        speed = a.prefill_unpruned_ms / max(a.prefill_ms, 1e-9)
        timing = (
            f"| | pruned ({pruner}, {a.kept} tokens) | unpruned ({n} tokens) |\n|---|---|---|\n"
            f"| prefill (ms) | {a.prefill_ms:.1f} | {a.prefill_unpruned_ms:.1f} |\n"
            f"| total, ≤ {max_new_tokens} new tokens (ms) | {a.total_ms:.1f} | {a.total_unpruned_ms:.1f} |\n\n"
            f"prefill speed-up **{speed:.2f}x** (median of {repeats} interleaved runs, CPU)"
        )
        return answers, overlay, timing


# --------------------------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------------------------
def _no_model(app: DemoApp, kind: str, what: str) -> None:
    gr.Markdown(
        NO_MODEL.format(what=what, root=app.models_dir, how=core.HOW_TO_TRAIN[kind]),
        elem_id=f"missing-{kind.split()[0]}",
    )


def _image_picker(prefix: str, default_source: str = "Fashion-MNIST") -> list[gr.components.Component]:
    """Source radio + index/seed + photo + upload; only the inputs the chosen source uses are shown."""
    photos = core.photo_names()
    source = gr.Radio(list(core.SOURCES), value=default_source, label="Image", elem_id=f"{prefix}-source")
    index = gr.Number(value=0, precision=0, label="Fashion-MNIST test index / scene seed", elem_id=f"{prefix}-index")
    photo = gr.Dropdown(photos, value=photos[0] if photos else None, label="Photo", visible=False)
    upload = gr.Image(type="numpy", label="Upload", visible=False, height=160, elem_id=f"{prefix}-upload")

    def show(src: str):
        return (
            gr.update(visible=src in ("Fashion-MNIST", "fashion scene")),
            gr.update(visible=src == "photo"),
            gr.update(visible=src == "upload"),
        )

    source.change(show, source, [index, photo, upload])
    return [source, index, photo, upload]


def _out_image(label: str, elem_id: str) -> gr.Image:
    return gr.Image(label=label, type="numpy", format="png", interactive=False, height=256, elem_id=elem_id)


def _tokenizer_tab(app: DemoApp) -> None:
    labels = app.labels(core.TOKENIZER)
    if not labels:
        return _no_model(app, core.TOKENIZER, "tokenizer")
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            model = gr.Dropdown(labels, value=labels[0], label="Tokenizer folder", elem_id="tok-model")
            picker = _image_picker("tok")
            use_bpe = gr.Checkbox(value=True, label="count tokens after 2D BPE")
            button = gr.Button("Reconstruct", variant="primary", elem_id="tok-run")
        with gr.Column(scale=3):
            with gr.Row():
                original = _out_image("Original (as the tokenizer sees it)", "tok-original")
                recon = _out_image("Reconstruction from the ids", "tok-recon")
            with gr.Row():
                codes = _out_image("Code ids (colour = id)", "tok-codes")
                bpe = _out_image("BPE tokens (one colour per merged token)", "tok-bpe")
            stats = gr.Markdown(elem_id="tok-stats", elem_classes="mmtok-stats")
    button.click(app.run_tokenizer, [model, *picker, use_bpe], [original, recon, codes, bpe, stats])


def _mim_tab(app: DemoApp) -> None:
    from mmtok import registries

    labels = app.labels(core.MIM)
    if not labels:
        return _no_model(app, core.MIM, "masked-autoencoder (MAE) model")
    maskers = registries.get("masker").list()
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            model = gr.Dropdown(labels, value=labels[0], label="MAE folder", elem_id="mim-model")
            picker = _image_picker("mim")
            masker = gr.Dropdown(maskers, value="random" if "random" in maskers else maskers[0], label="Masker")
            ratio = gr.Slider(0.05, 0.95, value=0.75, step=0.05, label="Mask ratio", elem_id="mim-ratio")
            seed = gr.Number(value=0, precision=0, label="Mask seed")
            button = gr.Button("Mask and reconstruct", variant="primary", elem_id="mim-run")
        with gr.Column(scale=3):
            with gr.Row():
                original = _out_image("Original", "mim-original")
                masked = _out_image("Masked (grey = hidden)", "mim-masked")
                recon = _out_image("Reconstruction", "mim-recon")
            info = gr.Markdown(elem_id="mim-info")
    button.click(app.run_mim, [model, *picker, masker, ratio, seed], [original, masked, recon, info])


def _mllm_tab(app: DemoApp) -> None:
    from mmtok import registries

    labels = app.labels(core.MLLM_KIND)
    if not labels:
        return _no_model(app, core.MLLM_KIND, "MLLM")
    pruners = registries.get("pruner").list()
    n, _ = app.mllm_info(labels[0])
    img0, q0, truth0 = app.scene(labels[0], 0)
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            model = gr.Dropdown(labels, value=labels[0], label="MLLM folder", elem_id="mllm-model")
            source = gr.Radio(["fashion scene", "upload"], value="fashion scene", label="Image")
            seed = gr.Number(value=0, precision=0, label="Scene seed", elem_id="mllm-seed")
            upload = gr.Image(type="numpy", label="Upload", visible=False, height=160)
            question = gr.Dropdown(
                q0["choices"],
                value=q0["value"],
                allow_custom_value=True,
                label="Question (pick or type)",
                elem_id="mllm-question",
            )
            default = "dart" if "dart" in pruners else pruners[0]
            pruner = gr.Dropdown(pruners, value=default, label="Pruner", elem_id="mllm-pruner")
            budget = gr.Slider(1, n, value=max(1, n // 4), step=1, label="Image tokens kept", elem_id="mllm-budget")
            button = gr.Button("Answer", variant="primary", elem_id="mllm-run")
        with gr.Column(scale=3):
            with gr.Row():
                scene = gr.Image(img0, label="Image", format="png", interactive=False, height=256, elem_id="mllm-scene")
                overlay = _out_image("Kept image tokens (dimmed = pruned)", "mllm-overlay")
            truth = gr.Markdown(truth0)
            answer = gr.Markdown(elem_id="mllm-answer")
            timing = gr.Markdown(elem_id="mllm-timing", elem_classes="mmtok-stats")

    def on_model(label: str, budget_now: float):
        n, _ = app.mllm_info(label)
        return gr.update(maximum=n, value=min(int(budget_now), n))

    source.change(
        lambda s: (gr.update(visible=s != "upload"), gr.update(visible=s == "upload")), source, [seed, upload]
    )
    seed.change(app.scene, [model, seed], [scene, question, truth])
    model.change(on_model, [model, budget], budget).then(app.scene, [model, seed], [scene, question, truth])
    button.click(app.run_mllm, [model, source, seed, upload, question, pruner, budget], [answer, overlay, timing])


def build_demo(models_dir: str = "runs") -> gr.Blocks:
    """The demo over the model folders found under ``models_dir`` (the ``DemoApp`` is ``demo.mmtok_app``)."""
    app = DemoApp(models_dir)
    counts = [len(app.models[k]) for k in core.KINDS]
    found = ", ".join(f"{c} {what}{'s' if c != 1 else ''}" for c, what in zip(counts, ("tokenizer", "MAE", "MLLM")))
    with gr.Blocks(title="mmtok demo", analytics_enabled=False) as demo:
        gr.Markdown(
            "# mmtok demo\nVisual tokenizers, masked image modeling, and an MLLM with visual-token pruning, "
            f"on the CPU with the models under `{app.models_dir}` ({found})."
        )
        with gr.Tabs():
            with gr.Tab(TAB_TITLES[core.TOKENIZER], id="tokenizer"):
                _tokenizer_tab(app)
            with gr.Tab(TAB_TITLES[core.MIM], id="mim"):
                _mim_tab(app)
            with gr.Tab(TAB_TITLES[core.MLLM_KIND], id="mllm"):
                _mllm_tab(app)
    demo.mmtok_app = app
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True, quiet: bool = False):
    """Serve ``demo`` on ``host:port`` with the offline theme; ``block=False`` returns once it is up."""
    return demo.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        ssr_mode=False,  # server-side rendering needs Node; the plain page needs nothing
        share=False,
        quiet=quiet,
        theme=theme(),
        css=CSS,
    )

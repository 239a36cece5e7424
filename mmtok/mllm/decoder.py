"""mmtok's own generic decoder loop over a transformers causal LM, for an allow-list of families.

Token pruning inside the LLM (FastV, DART) needs to change the sequence between two decoder layers.
Reference implementations fork ``LlamaModel.forward`` and break on every transformers release. We do not
fork or monkeypatch anything: we call the model's public sub-modules ourselves —
``model.model.embed_tokens``, ``model.model.rotary_emb(hidden, position_ids)``, each
``model.model.layers[i](hidden, attention_mask=..., position_ids=..., cache=..., position_embeddings=...)``,
``model.model.norm`` and ``model.lm_head`` — with 4-D additive masks we build, with whatever attention kernel
the model uses (SDPA by default; eager where the family needs it).

What a family's ``XModel.forward`` / ``XForCausalLM.forward`` does outside its decoder layers has to be
redone here, so only families whose outer code we reproduce exactly, and test against transformers
(``tests/test_mllm_decoder.py``, ``tests/test_mllm_hf_conformance.py``), are accepted; :data:`FAMILIES`
records what each one adds (transformers 5.24 modeling code):

* which layers use a sliding window: none (Llama, Gemma, Granite), every layer when
  ``config.sliding_window`` is set (Mistral), or per layer from ``config.layer_types`` (Qwen2 / Qwen3, where
  ``use_sliding_window`` + ``max_window_layers`` fill it in; Gemma2, alternating);
* an input-embedding multiplier applied to the merged embeddings, image features included (Granite's
  ``embedding_multiplier``; Gemma's ``sqrt(hidden_size)`` lives inside its ``embed_tokens`` and so is
  applied by whoever embeds the text, exactly as in transformers' LLaVA);
* a logits divisor (Granite's ``logits_scaling``) and a final logit soft-cap (Gemma2): :func:`lm_logits`.
  transformers' LLaVA wrappers skip both (they apply their own ``lm_head`` to the text model's output), so
  :func:`lm_logits` offers both conventions: the family's causal-LM head and LLaVA's plain head;
* an attention-score soft-cap (Gemma2), which only eager attention applies, so such a model must run eagerly.

Residual / attention multipliers and per-layer norms live inside the decoder layers and need nothing here.
Anything else (another ``model_type``, an unknown layer type, an attention kernel other than eager / SDPA)
raises :class:`UnsupportedLLMError` when the MLLM is built.

Differences from transformers, by design: the sliding window is measured on position ids, not on cache
indices (the same for every unpruned sequence, left padding included; after in-LLM pruning a kept token
still sees exactly the tokens within ``window`` original positions). The KV cache is a plain
``DynamicCache`` that keeps every key of sliding layers too (their masks hide the old ones): after pruning
the cache lengths differ per layer group, and the pruners read full keys of layer ``K - 1``.

Cache after in-LLM pruning at layer K: layers ``< K`` saw every token and keep all of them in their cache;
layers ``>= K`` only ever see the kept tokens. The two groups therefore have caches of different lengths;
:class:`DecodeState` keeps one key-validity mask and key positions per group so that each decoding step
builds the right mask per layer (and per window). Position ids are the original positions (never
re-indexed), and a generated token gets position ``last original position + 1``.

Host cost (a thin or batch-1 model is bound by it, not by arithmetic; ``tools/bench/decode.py`` measures it): a
call reads the family and the layer windows once, builds one additive mask per layer group and distinct window (at
most two per group; a decoding step's mask is the key validity alone, no index grids) and the rotary embeddings once.
Measured on CPU, mmtok's own code is about 2% of a decoding step's host time; the rest is the transformers decoder
layer itself (some 40 operators each), which we call as it is.

Proportional attention (ToMe, arXiv:2210.09461): ``run_layers(..., key_bias=[B, L])`` adds a per-key term to every
allowed entry of the additive masks (blocked entries stay blocked), e.g. ``log(size)`` for a merged image token that
stands for ``size`` patches, so that a query attends to it as much as to its ``size`` sources together. The bias
follows the keys through pruning and the KV cache (generated tokens get 0); SDPA stays the kernel.
"""

from __future__ import annotations

import bisect
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


class UnsupportedLLMError(ValueError):
    """The causal LM is of a family (or configuration) mmtok's decoder loop does not reproduce exactly."""


@dataclass(frozen=True)
class Family:
    """What one transformers family does outside its decoder layers; every field names a config attribute.

    Attributes:
        windows: ``"none"`` (every layer full causal), ``"all"`` (``config.sliding_window`` on every layer,
            None = full) or ``"layer_types"`` (``config.layer_types[i]`` is ``full_attention`` or
            ``sliding_attention``).
        embedding_multiplier: Attribute the input embeddings are multiplied by before the first layer.
        logits_divisor: Attribute the logits are divided by.
        final_softcap: Attribute ``c`` of the final soft-cap ``logits -> c * tanh(logits / c)`` (None = off).
        attn_softcap: Attribute of the attention-score soft-cap (applied by eager attention only).
    """

    windows: str = "none"
    embedding_multiplier: str | None = None
    logits_divisor: str | None = None
    final_softcap: str | None = None
    attn_softcap: str | None = None


# The allow-list: every entry is tested against transformers' own model (logits and greedy generation).
FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(windows="all"),
    "qwen2": Family(windows="layer_types"),
    "qwen3": Family(windows="layer_types"),
    "gemma": Family(),
    "gemma2": Family(
        windows="layer_types", final_softcap="final_logit_softcapping", attn_softcap="attn_logit_softcapping"
    ),
    "granite": Family(embedding_multiplier="embedding_multiplier", logits_divisor="logits_scaling"),
}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  # kernels that take our 4-D additive masks (tested)


def family_of(llm: nn.Module) -> Family:
    """The :class:`Family` entry of ``llm`` (by ``config.model_type``), or :class:`UnsupportedLLMError`."""
    cfg = llm.config
    model_type = getattr(cfg, "model_type", None)
    fam = FAMILIES.get(model_type)
    if fam is None:
        raise UnsupportedLLMError(
            f"LLM family {model_type!r} ({type(llm).__name__}) is not supported by mmtok's decoder loop; the "
            f"families reproduced exactly and tested against transformers are {', '.join(sorted(FAMILIES))}. "
            "Use one of them, or add the family to mmtok.mllm.decoder.FAMILIES together with a conformance test"
        )
    impl = getattr(cfg, "_attn_implementation", None) or "sdpa"
    if impl not in ATTN_IMPLEMENTATIONS:
        raise UnsupportedLLMError(
            f"attention implementation {impl!r} is not supported by mmtok's decoder loop (it passes 4-D additive "
            f"masks); load the LLM with attn_implementation in {ATTN_IMPLEMENTATIONS}"
        )
    if fam.attn_softcap and getattr(cfg, fam.attn_softcap, None) is not None and impl != "eager":
        raise UnsupportedLLMError(
            f"{model_type} soft-caps attention scores ({fam.attn_softcap}={getattr(cfg, fam.attn_softcap)}), "
            f"which only eager attention applies; load it with attn_implementation='eager', not {impl!r}"
        )
    return fam


def decoder_parts(llm: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module, nn.Module, nn.Module]:
    """``(embed_tokens, layers, norm, rotary_emb, lm_head)`` of an accepted causal LM, or a clear error.

    Raises:
        UnsupportedLLMError: The family, its layer types or its attention kernel are not supported.
        TypeError: The model lacks the sub-modules the loop calls.
    """
    return _loop_parts(llm)[:5]


def _loop_parts(llm: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module, nn.Module, nn.Module, list[int | None]]:
    """:func:`decoder_parts` and :func:`layer_windows` in one pass (the family is looked up once per call).

    The loops call this once per prefill / decoding step: config attribute reads are slow in transformers 5
    (every one goes through the config's ``__getattribute__``), so nothing here is repeated per layer.
    """
    fam = family_of(llm)
    base = getattr(llm, "model", None)
    parts = [getattr(base, n, None) for n in ("embed_tokens", "layers", "norm", "rotary_emb")]
    head = getattr(llm, "lm_head", None)
    if base is None or any(p is None for p in parts) or head is None:
        raise TypeError(
            f"{type(llm).__name__} does not look like a transformers causal LM of its family "
            "(needs .model.embed_tokens/.layers/.norm/.rotary_emb and .lm_head)"
        )
    windows = _layer_windows(llm, fam)  # validates layer_types
    if len(parts[1]) > len(windows):  # transformers runs only the first num_hidden_layers
        parts[1] = parts[1][: len(windows)]
    return (*parts, head, windows)  # type: ignore[return-value]


def layer_windows(llm: nn.Module) -> list[int | None]:
    """Sliding window of every decoder layer (None = full causal attention), as transformers masks them.

    Returns:
        ``num_hidden_layers`` entries.
    """
    return _layer_windows(llm, family_of(llm))


def _layer_windows(llm: nn.Module, fam: Family) -> list[int | None]:
    cfg = llm.config
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    if fam.windows == "none":  # such families ignore a stray config.sliding_window, and so do we
        return [None] * n
    if fam.windows == "all":
        return [None if window is None else int(window)] * n
    types = getattr(cfg, "layer_types", None)
    if types is None or len(types) < n:
        raise UnsupportedLLMError(f"{cfg.model_type} config needs layer_types for its {n} layers, got {types!r}")
    out: list[int | None] = []
    for i, kind in enumerate(types[:n]):
        if kind == "full_attention":
            out.append(None)
        elif kind == "sliding_attention":
            if window is None:
                raise UnsupportedLLMError(
                    f"layer {i} is 'sliding_attention' but config.sliding_window is None: set a window "
                    "(Qwen2/Qwen3: use_sliding_window=True) or make the layer 'full_attention'"
                )
            out.append(int(window))
        else:
            raise UnsupportedLLMError(
                f"layer {i} has attention type {kind!r}; mmtok's decoder loop supports 'full_attention' and "
                "'sliding_attention' only"
            )
    return out


def scale_embeddings(llm: nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    """Input embeddings ``[B, L, D]`` as the family's first layer sees them (Granite's embedding multiplier).

    Applied to the merged sequence (image features included), as transformers' LLaVA passes ``inputs_embeds``
    to the language model, which multiplies them.
    """
    fam = family_of(llm)
    if fam.embedding_multiplier:
        embeds = embeds * getattr(llm.config, fam.embedding_multiplier)
    return embeds


LOGITS_CONVENTIONS = ("causal_lm", "llava")


def lm_logits(llm: nn.Module, hidden: torch.Tensor, *, convention: str = "causal_lm") -> torch.Tensor:
    """Next-token logits ``[..., V]`` from normed hidden states ``[..., D]``.

    Args:
        llm: A causal LM of an accepted family.
        hidden: ``[..., D]`` after the final norm (:attr:`LayerRunOutput.hidden`).
        convention: ``"causal_lm"``: as the family's ``XForCausalLM`` computes them: ``lm_head``, then
            Granite's division by ``logits_scaling`` and Gemma2's final soft-cap ``c * tanh(logits / c)``
            (values in ``(-c, c)``); the right head for an LLM trained on its own. ``"llava"``: ``lm_head``
            alone, as transformers' LLaVA wrappers compute them (their own ``lm_head`` after the text model,
            so neither the divisor nor the soft-cap is applied): the right head for a LLaVA checkpoint.
    """
    if convention not in LOGITS_CONVENTIONS:
        raise ValueError(f"convention must be one of {LOGITS_CONVENTIONS}, not {convention!r}")
    fam = family_of(llm)
    cfg = llm.config
    logits = llm.lm_head(hidden)
    if convention == "llava":
        return logits
    if fam.logits_divisor:
        logits = logits / getattr(cfg, fam.logits_divisor)
    cap = getattr(cfg, fam.final_softcap, None) if fam.final_softcap else None
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the accepted families apply it: ``x [B, H, T, d]``, ``cos/sin [B, T, d]``."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def additive_mask(
    key_valid: torch.Tensor,
    num_queries: int,
    dtype: torch.dtype,
    *,
    key_pos: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
    sliding_window: int | None = None,
    bidirectional_tail: int = 0,
) -> torch.Tensor:
    """Causal + padding mask ``[B, 1, Q, S]`` (0 = attend, dtype-min = blocked).

    The ``Q`` queries are the last ``Q`` entries of the ``S`` keys (prefill: Q == S; decoding: Q == 1), so
    causality is by index. ``key_valid [B, S]`` marks real (non-pad) keys. A sliding window (a query sees
    keys less than ``sliding_window`` positions back, the query itself included) is applied on position
    ids ``key_pos [B, S]`` / ``query_pos [B, Q]``. ``bidirectional_tail = T`` lets the last ``T`` tokens see
    each other both ways (the all-mask head's block of mask tokens, STAMP); everything before them stays
    causal and cannot see them.
    """
    b, s = key_valid.shape
    dev = key_valid.device
    valid = key_valid[:, None, :].bool()  # [B, 1, S]
    if num_queries == 1:
        # one query is the last key: causality (and a bidirectional tail, which holds it) lets it see every key, so
        # a decoding step's mask is the key validity alone; this skips the index grids on every generated token
        allowed = valid  # [B, 1, S]
    else:
        q_idx = torch.arange(s - num_queries, s, device=dev)
        k_idx = torch.arange(s, device=dev)
        causal = q_idx[:, None] >= k_idx[None, :]  # [Q, S]
        if bidirectional_tail:
            tail = s - bidirectional_tail
            causal = causal | ((q_idx[:, None] >= tail) & (k_idx[None, :] >= tail))
        allowed = causal[None] & valid  # [B, Q, S]
    if sliding_window is not None:
        if key_pos is None or query_pos is None:
            raise ValueError("a sliding window needs key_pos and query_pos")
        allowed = allowed & (query_pos[:, :, None] - key_pos[:, None, :] < sliding_window)
    # the same 0 / dtype-min values as zeros().masked_fill(~allowed), one kernel fewer
    mask = torch.full((b, 1, num_queries, s), torch.finfo(dtype).min, dtype=dtype, device=dev)
    return mask.masked_fill_(allowed[:, None], 0.0)


def _masks(
    windows: list[int | None],
    key_valid: torch.Tensor,
    num_queries: int,
    dtype: torch.dtype,
    key_pos: torch.Tensor,
    query_pos: torch.Tensor,
    bidirectional_tail: int,
) -> dict[int | None, torch.Tensor]:
    """One :func:`additive_mask` per distinct window in ``windows`` (a model has at most two)."""
    return {
        w: additive_mask(
            key_valid,
            num_queries,
            dtype,
            key_pos=key_pos,
            query_pos=query_pos,
            sliding_window=w,
            bidirectional_tail=bidirectional_tail,
        )
        for w in dict.fromkeys(windows)
    }


@dataclass
class DecodeState:
    """Per-layer-group bookkeeping of the KV cache (group 0 = layers before the prune layer)."""

    cache: object  # transformers DynamicCache
    group_start: list[int]  # first layer index of each group, e.g. [0] or [0, K]
    key_valid: list[torch.Tensor]  # per group [B, S_g] bool
    key_pos: list[torch.Tensor]  # per group [B, S_g] long
    next_pos: torch.Tensor  # [B] position id of the next token
    key_bias: list[torch.Tensor] | None = None  # per group [B, S_g] additive per-key attention bias (None = none)

    def group_of(self, layer: int) -> int:
        """The group of ``layer``: the last group whose first layer is at or before it (``group_start`` ascends)."""
        return max(bisect.bisect_right(self.group_start, layer) - 1, 0)


@dataclass
class LayerRunOutput:
    hidden: torch.Tensor  # [B, L', D] after the final norm
    key_valid: torch.Tensor  # [B, L'] of the sequence that reached the last layer
    position_ids: torch.Tensor  # [B, L']
    keep_index: torch.Tensor | None  # [B, L'] sequence positions kept at the prune layer (None = all)
    state: DecodeState | None
    extras: dict = field(default_factory=dict)


# A callback invoked at the input of layer K: (layer_index, hidden [B, L, D], valid [B, L], position_ids [B, L],
# layer_inputs: dict[int, Tensor] of earlier layers' inputs, cache) -> keep index [B, L'] or None.
PruneHook = Callable[..., "torch.Tensor | None"]


def with_key_bias(
    masks: dict[int | None, torch.Tensor], key_bias: torch.Tensor | None
) -> dict[int | None, torch.Tensor]:
    """Add ``key_bias [B, S]`` to the allowed entries of every additive mask ``[B, 1, Q, S]`` (blocked stay blocked)."""
    if key_bias is None:
        return masks
    out = {}
    for w, m in masks.items():
        bias = key_bias.to(m.dtype)[:, None, None, :]  # [B, 1, 1, S]
        out[w] = torch.where(m == 0, bias, m)  # 0 marks an allowed entry in these masks
    return out


@functools.cache
def _cache_keyword(layer_cls: type) -> str:
    """The decoder layer's KV-cache argument: ``cache`` in recent transformers, ``past_key_values`` before it.

    The layers take ``**kwargs``, so a misnamed cache is silently ignored and decoding sees only the new token.
    """
    params = inspect.signature(layer_cls.forward).parameters
    return next((k for k in ("cache", "past_key_values", "past_key_value") if k in params), "cache")


def _call_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    position_ids: torch.Tensor,
    pos_emb: tuple[torch.Tensor, torch.Tensor],
    cache: object = None,
    use_cache: bool = False,
) -> torch.Tensor:
    # keywords only: the families order their layer arguments differently (Gemma2 puts position_embeddings second)
    return layer(
        hidden,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=use_cache,
        position_embeddings=pos_emb,
        **{_cache_keyword(type(layer)): cache},
    )


def run_layers(
    llm: nn.Module,
    hidden: torch.Tensor,
    key_valid: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    use_cache: bool = False,
    prune_layer: int | None = None,
    prune_hook: PruneHook | None = None,
    keep_inputs_of: tuple[int, ...] = (),
    grad_checkpointing: bool = False,
    bidirectional_tail: int = 0,
    key_bias: torch.Tensor | None = None,
) -> LayerRunOutput:
    """Run every decoder layer on ``hidden [B, L, D]`` (prefill or training), optionally pruning at one layer.

    Args:
        llm: A transformers causal LM of an accepted family (:data:`FAMILIES`).
        hidden: Input embeddings ``[B, L, D]`` (as ``embed_tokens`` gives them, image features merged in);
            the family's embedding multiplier is applied here.
        key_valid: ``[B, L]`` True for real tokens, False for (left) padding.
        position_ids: ``[B, L]`` position of each token.
        use_cache: Build a :class:`DecodeState` with a ``DynamicCache`` for generation.
        prune_layer: Layer index K at whose input ``prune_hook`` is called (``1 <= K < num_layers``).
        prune_hook: Returns sequence indices ``[B, L']`` to keep (sorted), or None to keep all.
        keep_inputs_of: Layer indices whose inputs are remembered and passed to the hook (e.g. ``(K-1,)``).
        grad_checkpointing: Recompute each layer in the backward pass (training memory).
        bidirectional_tail: The last this many tokens attend to each other both ways (see
            :func:`additive_mask`); they are never pruned (they follow every image token).
        key_bias: ``[B, L]`` float added to the attention logits of every query for that key (proportional
            attention: ``log(size)`` at merged tokens, 0 elsewhere); None = no bias.

    Returns:
        :class:`LayerRunOutput` with the normed hidden states (logits: :func:`lm_logits`).
    """
    from transformers import DynamicCache

    _, layers, norm, rotary, _, windows = _loop_parts(llm)
    # a plain cache (no config): sliding layers keep every key too, see the module docstring
    cache = DynamicCache() if use_cache else None
    checkpointed = grad_checkpointing and torch.is_grad_enabled()
    dtype = hidden.dtype
    hidden = scale_embeddings(llm, hidden)
    masks = _masks(windows, key_valid, hidden.shape[1], dtype, position_ids, position_ids, bidirectional_tail)
    masks = with_key_bias(masks, key_bias)
    pos_emb = rotary(hidden, position_ids)
    group_start, valids, positions = [0], [key_valid], [position_ids]
    biases = [key_bias]
    saved: dict[int, torch.Tensor] = {}
    keep_index = None
    for i, layer in enumerate(layers):
        if prune_hook is not None and i == prune_layer:
            keep_index = prune_hook(i, hidden, key_valid, position_ids, saved, cache)
            if keep_index is not None:
                hidden = _take(hidden, keep_index)
                key_valid = key_valid.gather(1, keep_index)
                position_ids = position_ids.gather(1, keep_index)
                masks = _masks(
                    windows, key_valid, hidden.shape[1], dtype, position_ids, position_ids, bidirectional_tail
                )
                if key_bias is not None:  # the bias follows its keys
                    key_bias = key_bias.gather(1, keep_index)
                    masks = with_key_bias(masks, key_bias)
                pos_emb = rotary(hidden, position_ids)
                group_start.append(i)
                valids.append(key_valid)
                positions.append(position_ids)
                biases.append(key_bias)
        if i in keep_inputs_of:
            saved[i] = hidden
        mask = masks[windows[i]]
        if checkpointed:
            from torch.utils.checkpoint import checkpoint

            hidden = checkpoint(_call_layer, layer, hidden, mask, position_ids, pos_emb, use_reentrant=False)
        else:
            hidden = _call_layer(layer, hidden, mask, position_ids, pos_emb, cache, use_cache)
    hidden = norm(hidden)
    state = None
    if use_cache:
        next_pos = position_ids.masked_fill(~key_valid.bool(), -1).max(dim=1).values + 1
        state = DecodeState(cache, group_start, valids, positions, next_pos, biases if biases[0] is not None else None)
    return LayerRunOutput(hidden, key_valid, position_ids, keep_index, state)


def decode_step(llm: nn.Module, token_embeds: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """One generation step: ``token_embeds [B, 1, D]`` -> normed hidden ``[B, 1, D]``, extending ``state``."""
    return decode_chunk(llm, token_embeds, state)


def decode_chunk(
    llm: nn.Module, embeds: torch.Tensor, state: DecodeState, *, bidirectional: bool = False
) -> torch.Tensor:
    """Append ``T`` tokens ``embeds [B, T, D]`` after the cached sequence -> normed hidden ``[B, T, D]``.

    The new tokens see every valid cached key (per layer group, so in-LLM pruning is respected, and within
    each layer's sliding window) and each other causally, or both ways with ``bidirectional=True`` (the
    all-mask head's mask tokens). They get the positions ``next_pos .. next_pos + T - 1``. ``embeds`` come
    from ``embed_tokens``; the family's embedding multiplier is applied here.
    """
    _, layers, norm, rotary, _, windows = _loop_parts(llm)
    b, t = embeds.shape[:2]
    pos = state.next_pos[:, None] + torch.arange(t, device=embeds.device)[None, :]  # [B, T]
    ones = torch.ones(b, t, dtype=torch.bool, device=embeds.device)
    state.key_valid = [torch.cat([v.bool(), ones], dim=1) for v in state.key_valid]
    state.key_pos = [torch.cat([p, pos], dim=1) for p in state.key_pos]
    tail = t if bidirectional else 0
    masks = [_masks(windows, v, t, embeds.dtype, p, pos, tail) for v, p in zip(state.key_valid, state.key_pos)]
    if state.key_bias is not None:  # new tokens stand for themselves: bias 0
        zeros = torch.zeros(b, t, device=embeds.device)
        state.key_bias = [torch.cat([kb.to(zeros.dtype), zeros], dim=1) for kb in state.key_bias]
        masks = [with_key_bias(m, kb) for m, kb in zip(masks, state.key_bias)]
    hidden = scale_embeddings(llm, embeds)
    pos_emb = rotary(hidden, pos)  # once per step: every layer sees the same positions
    for i, (layer, w) in enumerate(zip(layers, windows)):
        hidden = _call_layer(layer, hidden, masks[state.group_of(i)][w], pos, pos_emb, state.cache, True)
    state.next_pos = state.next_pos + t
    return norm(hidden)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather rows ``index [B, L']`` of ``x [B, L, D]`` -> ``[B, L', D]``."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def layer_keys(llm: nn.Module, layer: int, hidden_in: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Post-RoPE keys ``[B, H_kv, L, d]`` of decoder ``layer`` recomputed from its input ``[B, L, D]``."""
    _, layers, _, rotary, _ = decoder_parts(llm)
    blk = layers[layer]
    attn = blk.self_attn
    x = blk.input_layernorm(hidden_in)
    k = attn.k_proj(x).view(*x.shape[:2], -1, attn.head_dim).transpose(1, 2)
    if hasattr(attn, "k_norm"):  # Qwen3-style q/k norms
        k = attn.k_norm(k)
    cos, sin = rotary(hidden_in, position_ids)
    return apply_rope(k, cos, sin)


def layer_query_rows(
    llm: nn.Module, layer: int, hidden_rows: torch.Tensor, position_rows: torch.Tensor
) -> torch.Tensor:
    """Post-RoPE queries ``[B, H, R, d]`` of decoder ``layer`` for a few rows ``hidden_rows [B, R, D]`` only."""
    _, layers, _, rotary, _ = decoder_parts(llm)
    blk = layers[layer]
    attn = blk.self_attn
    x = blk.input_layernorm(hidden_rows)
    q = attn.q_proj(x).view(*x.shape[:2], -1, attn.head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q)
    cos, sin = rotary(hidden_rows, position_rows)
    return apply_rope(q, cos, sin)


def attention_rows(
    llm: nn.Module, layer: int, q_rows: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor
) -> torch.Tensor:
    """Softmax attention of the last few query rows over all keys of an unpruned sequence: ``[B, H, R, L]``.

    ``q_rows [B, H, R, d]`` are the queries of the last ``R`` tokens, ``keys [B, H_kv, L, d]`` every key
    (grouped-query heads are repeated), ``key_valid [B, L]``. As the layer itself computes them: its scaling,
    its score soft-cap (Gemma2), causal among the rows, and its sliding window (by index, which is the
    position difference on an unpruned sequence, left padding included).
    """
    _, layers, _, _, _ = decoder_parts(llm)
    attn = layers[layer].self_attn
    fam = family_of(llm)
    groups = q_rows.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)
    scores = (q_rows.float() @ keys.float().transpose(-1, -2)) * attn.scaling  # [B, H, R, L]
    cap = getattr(llm.config, fam.attn_softcap, None) if fam.attn_softcap else None
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    r, s = q_rows.shape[2], keys.shape[2]
    q_idx = torch.arange(s - r, s, device=keys.device)[:, None]  # [R, 1]
    k_idx = torch.arange(s, device=keys.device)[None, :]  # [1, L]
    allowed = (k_idx <= q_idx) & key_valid.bool()[:, None, None, :]  # [B, 1, R, L]
    window = layer_windows(llm)[layer]
    if window is not None:
        allowed = allowed & (q_idx - k_idx < window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1)

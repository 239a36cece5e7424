"""mmtok's own generic decoder loop over a transformers causal LM (Llama / Qwen2 / Mistral families).

Token pruning inside the LLM (FastV, DART) needs to change the sequence between two decoder layers.
Reference implementations fork ``LlamaModel.forward`` and break on every transformers release. We do not
fork or monkeypatch anything: we call the model's public sub-modules ourselves —
``model.model.embed_tokens``, ``model.model.rotary_emb(hidden, position_ids)``, each
``model.model.layers[i](hidden, attention_mask=..., position_ids=..., cache=..., position_embeddings=...)``,
``model.model.norm`` and ``model.lm_head`` — with a 4-D additive mask we build, so every family whose
decoder layers take that signature works, with whatever attention kernel the model uses (SDPA by default).

Cache after in-LLM pruning at layer K: layers ``< K`` saw every token and keep all of them in their cache;
layers ``>= K`` only ever see the kept tokens. The two groups therefore have caches of different lengths;
:class:`DecodeState` keeps one key-validity mask (and key positions, for sliding windows) per group so that
each decoding step builds the right mask per layer. Position ids are the original positions (never
re-indexed), and a generated token gets position ``last original position + 1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


def decoder_parts(llm: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module, nn.Module, nn.Module]:
    """``(embed_tokens, layers, norm, rotary_emb, lm_head)`` of a transformers causal LM, or a clear error."""
    base = getattr(llm, "model", None)
    parts = [getattr(base, n, None) for n in ("embed_tokens", "layers", "norm", "rotary_emb")]
    head = getattr(llm, "lm_head", None)
    if base is None or any(p is None for p in parts) or head is None:
        raise TypeError(
            f"{type(llm).__name__} does not look like a Llama/Qwen2/Mistral-family causal LM "
            "(needs .model.embed_tokens/.layers/.norm/.rotary_emb and .lm_head)"
        )
    return (*parts, head)  # type: ignore[return-value]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the Llama/Qwen2/Mistral families apply it: ``x [B, H, T, d]``, ``cos/sin [B, T, d]``."""
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
    causality is by index. ``key_valid [B, S]`` marks real (non-pad) keys. A sliding window (Mistral,
    Qwen2 with ``use_sliding_window``) is applied on position ids. ``bidirectional_tail = T`` lets the last
    ``T`` tokens see each other both ways (the all-mask head's block of mask tokens, STAMP); everything
    before them stays causal and cannot see them.
    """
    b, s = key_valid.shape
    dev = key_valid.device
    q_idx = torch.arange(s - num_queries, s, device=dev)
    k_idx = torch.arange(s, device=dev)
    allowed = q_idx[:, None] >= k_idx[None, :]  # [Q, S]
    if bidirectional_tail:
        tail = s - bidirectional_tail
        allowed = allowed | ((q_idx[:, None] >= tail) & (k_idx[None, :] >= tail))
    allowed = allowed[None] & key_valid[:, None, :].bool()  # [B, Q, S]
    if sliding_window is not None and key_pos is not None and query_pos is not None:
        allowed = allowed & (query_pos[:, :, None] - key_pos[:, None, :] < sliding_window)
    mask = torch.zeros(b, 1, num_queries, s, dtype=dtype, device=dev)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def sliding_window_of(llm: nn.Module) -> int | None:
    cfg = llm.config
    window = getattr(cfg, "sliding_window", None)
    if window is None or (hasattr(cfg, "use_sliding_window") and not cfg.use_sliding_window):
        return None
    return int(window)


@dataclass
class DecodeState:
    """Per-layer-group bookkeeping of the KV cache (group 0 = layers before the prune layer)."""

    cache: object  # transformers DynamicCache
    group_start: list[int]  # first layer index of each group, e.g. [0] or [0, K]
    key_valid: list[torch.Tensor]  # per group [B, S_g] bool
    key_pos: list[torch.Tensor]  # per group [B, S_g] long
    next_pos: torch.Tensor  # [B] position id of the next token

    def group_of(self, layer: int) -> int:
        g = 0
        for i, start in enumerate(self.group_start):
            if layer >= start:
                g = i
        return g


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
) -> LayerRunOutput:
    """Run every decoder layer on ``hidden [B, L, D]`` (prefill or training), optionally pruning at one layer.

    Args:
        llm: A transformers causal LM.
        hidden: Input embeddings ``[B, L, D]``.
        key_valid: ``[B, L]`` True for real tokens, False for (left) padding.
        position_ids: ``[B, L]`` position of each token.
        use_cache: Build a :class:`DecodeState` with a ``DynamicCache`` for generation.
        prune_layer: Layer index K at whose input ``prune_hook`` is called (``1 <= K < num_layers``).
        prune_hook: Returns sequence indices ``[B, L']`` to keep (sorted), or None to keep all.
        keep_inputs_of: Layer indices whose inputs are remembered and passed to the hook (e.g. ``(K-1,)``).
        grad_checkpointing: Recompute each layer in the backward pass (training memory).
        bidirectional_tail: The last this many tokens attend to each other both ways (see
            :func:`additive_mask`); they are never pruned (they follow every image token).
    """
    from transformers import DynamicCache

    _, layers, norm, rotary, _ = decoder_parts(llm)
    window = sliding_window_of(llm)
    cache = DynamicCache() if use_cache else None
    dtype = hidden.dtype
    mask = additive_mask(
        key_valid,
        hidden.shape[1],
        dtype,
        key_pos=position_ids,
        query_pos=position_ids,
        sliding_window=window,
        bidirectional_tail=bidirectional_tail,
    )
    pos_emb = rotary(hidden, position_ids)
    group_start, valids, positions = [0], [key_valid], [position_ids]
    saved: dict[int, torch.Tensor] = {}
    keep_index = None
    for i, layer in enumerate(layers):
        if prune_hook is not None and i == prune_layer:
            keep_index = prune_hook(i, hidden, key_valid, position_ids, saved, cache)
            if keep_index is not None:
                hidden = _take(hidden, keep_index)
                key_valid = key_valid.gather(1, keep_index)
                position_ids = position_ids.gather(1, keep_index)
                mask = additive_mask(
                    key_valid,
                    hidden.shape[1],
                    dtype,
                    key_pos=position_ids,
                    query_pos=position_ids,
                    sliding_window=window,
                    bidirectional_tail=bidirectional_tail,
                )
                pos_emb = rotary(hidden, position_ids)
                group_start.append(i)
                valids.append(key_valid)
                positions.append(position_ids)
        if i in keep_inputs_of:
            saved[i] = hidden
        if grad_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            hidden = checkpoint(layer, hidden, mask, position_ids, None, False, pos_emb, use_reentrant=False)
        else:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=pos_emb,
            )
    hidden = norm(hidden)
    state = None
    if use_cache:
        next_pos = position_ids.masked_fill(~key_valid.bool(), -1).max(dim=1).values + 1
        state = DecodeState(cache, group_start, valids, positions, next_pos)
    return LayerRunOutput(hidden, key_valid, position_ids, keep_index, state)


def decode_step(llm: nn.Module, token_embeds: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """One generation step: ``token_embeds [B, 1, D]`` -> normed hidden ``[B, 1, D]``, extending ``state``."""
    return decode_chunk(llm, token_embeds, state)


def decode_chunk(
    llm: nn.Module, embeds: torch.Tensor, state: DecodeState, *, bidirectional: bool = False
) -> torch.Tensor:
    """Append ``T`` tokens ``embeds [B, T, D]`` after the cached sequence -> normed hidden ``[B, T, D]``.

    The new tokens see every valid cached key (per layer group, so in-LLM pruning is respected) and each
    other causally, or both ways with ``bidirectional=True`` (the all-mask head's mask tokens). They get
    the positions ``next_pos .. next_pos + T - 1``.
    """
    _, layers, norm, rotary, _ = decoder_parts(llm)
    window = sliding_window_of(llm)
    b, t = embeds.shape[:2]
    pos = state.next_pos[:, None] + torch.arange(t, device=embeds.device)[None, :]  # [B, T]
    ones = torch.ones(b, t, dtype=torch.bool, device=embeds.device)
    state.key_valid = [torch.cat([v.bool(), ones], dim=1) for v in state.key_valid]
    state.key_pos = [torch.cat([p, pos], dim=1) for p in state.key_pos]
    masks = [
        additive_mask(
            v,
            t,
            embeds.dtype,
            key_pos=p,
            query_pos=pos,
            sliding_window=window,
            bidirectional_tail=t if bidirectional else 0,
        )
        for v, p in zip(state.key_valid, state.key_pos)
    ]
    pos_emb = rotary(embeds, pos)
    hidden = embeds
    for i, layer in enumerate(layers):
        g = state.group_of(i)
        hidden = layer(
            hidden,
            attention_mask=masks[g],
            position_ids=pos,
            cache=state.cache,
            use_cache=True,
            position_embeddings=pos_emb,
        )
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
    """Softmax attention of a few (last) query rows over all keys: ``[B, H, R, L]``.

    ``q_rows [B, H, R, d]``, ``keys [B, H_kv, L, d]`` (grouped-query heads are repeated); the rows are the
    last ``R`` tokens, so every valid key is visible to them (causal).
    """
    _, layers, _, _, _ = decoder_parts(llm)
    attn = layers[layer].self_attn
    groups = q_rows.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)
    scores = (q_rows.float() @ keys.float().transpose(-1, -2)) * attn.scaling  # [B, H, R, L]
    scores = scores.masked_fill(~key_valid.bool()[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)

"""ToMe / PiToMe merging inside a ViT: ``r`` tokens merged in every block, proportional attention on SDPA.

* ToMe (Bolya et al., arXiv:2210.09461; reference code facebookresearch/ToMe ``tome/patch/timm.py``): in every
  block, attention runs first (with ``log(size)`` added to the logits of every key when proportional attention is
  on), then the ``r`` best bipartite matches by cosine similarity of the keys averaged over heads are merged by
  size-weighted average, then the MLP runs on the merged tokens. The class token never merges.
* PiToMe (Tran et al., NeurIPS 2024, arXiv:2405.16148; reference code hchautran/PiToMe
  ``algo/pitome/patch/timm.py``): the same place in the block and the same metric, with the energy-guided step of
  :func:`mmtok.mllm.pruning.merge.pitome_step`; the margin falls linearly over depth,
  ``margin_l = margin_start - (margin_start - margin_end) * l / L``, by default ``0.9 - 0.8 l / L`` as the
  reference's ``apply_patch`` sets it (``margin_end=0.0`` gives ``0.9 - 0.9 l / L``). The reference sets the
  tokens merged per block by a ratio (``r = floor(T - T * ratio)`` of the ``T`` mergeable tokens):
  ``keep_ratio``; ToMe's is a count: ``r``.

What mmtok does differently: no timm class is forked or patched. :func:`merged_block` runs a timm ``Block`` from
its own sub-modules (``norm1``, ``attn.qkv``/``q_norm``/``k_norm``/``norm``/``proj``, ``ls1``, ``drop_path1``,
``norm2``, ``mlp``, ``ls2``, ``drop_path2``), so timm ViTs and mmtok's ViT encoder (built from timm ``Block`` s)
both work, and attention stays on ``F.scaled_dot_product_attention`` with the size bias as its additive mask (the
references compute the softmax by hand). With ``r = 0`` the result equals the tower's own forward (tested). Sizes
and a source map ``[B, P + N] -> 0..T'-1`` are tracked as indices (the references keep a dense ``T x T`` one-hot
matrix). ``reference=False`` (default) breaks ties towards the earlier token and puts the tokens back in raster
order after every block; ``reference=True`` keeps the reference's tie-breaking and token order (see
:mod:`mmtok.mllm.pruning.merge`). ToMe protects one class token only (as the reference); a tower with several
prefix tokens (register tokens) takes PiToMe, which protects them all.

Inside the MLLM, :func:`merging_tower` makes the tower return per-patch states again (each patch reads its merged
token through the source map), so the projector and the LLM see the usual ``N`` image tokens; the tower itself
runs on fewer tokens. Combine it with a pre-LLM merger (``tome``/``pitome``) to shorten the LLM's sequence too:
the per-patch copies are exact duplicates, which those merge first.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mmtok.mllm.pruning.base import PruningError
from mmtok.mllm.pruning.merge import first_sources, merge_wavg, pitome_step, reorder, tome_step

METHODS = ("tome", "pitome")


@dataclass
class TowerMergeConfig:
    """In-tower merging.

    Attributes:
        method: ``"tome"`` or ``"pitome"``.
        r: Tokens merged in every block (capped at half of the mergeable tokens of that block); 0 = off. A list
            gives one value per block (missing blocks: 0), as ToMe's per-layer schedules.
        prop_attn: Proportional attention (``log(size)`` added to the keys' logits). ToMe's advice: on for models
            used off the shelf, off for models trained with merging (and for MAE encoders).
        reference: The reference code's tie-breaking and token order (see the module docstring).
        keep_ratio: PiToMe's convention instead of ``r``: merge ``floor(T - T * keep_ratio)`` of the ``T`` mergeable
            tokens in every block (None = use ``r``).
        margin_start, margin_end: PiToMe's margin schedule over the blocks.
        alpha: PiToMe's ELU alpha.
    """

    method: str = "tome"
    r: int | list[int] = 0
    prop_attn: bool = True
    reference: bool = False
    keep_ratio: float | None = None
    margin_start: float = 0.9
    margin_end: float = 0.1
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PruningError(f"tower merging method must be one of {METHODS}, not {self.method!r}")
        values = self.r if isinstance(self.r, (list, tuple)) else [self.r]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise PruningError(
                f"tower merging r (tokens merged per block) must be an integer >= 0 or a list of them, got {self.r!r}"
            )

        if self.keep_ratio is not None and not 0.0 < float(self.keep_ratio) <= 1.0:
            raise PruningError(f"tower merging keep_ratio must be in (0, 1], got {self.keep_ratio!r}")

    def r_at(self, block: int, mergeable: int) -> int:
        """Tokens to merge in ``block`` whose input has ``mergeable`` tokens besides the prefix."""
        if self.keep_ratio is not None:
            return math.floor(mergeable - mergeable * float(self.keep_ratio))
        if isinstance(self.r, (list, tuple)):
            return int(self.r[block]) if block < len(self.r) else 0
        return int(self.r)

    def margin(self, block: int, depth: int) -> float:
        return self.margin_start - (self.margin_start - self.margin_end) * block / depth


@dataclass
class TowerMergeOutput:
    """The merged tower run.

    Attributes:
        hidden_states: ``depth + 1`` tensors (index 0 = embeddings ``[B, P + N, D]``, ``i`` = output of block ``i``,
            with that block's merged length).
        sizes: ``[B, T']`` float, original tokens per final token (prefix tokens count 1).
        source_map: ``[B, P + N]`` long: the final token each original token (prefix included) went into.
        source_maps: ``depth + 1`` source maps, one per entry of ``hidden_states``.
    """

    hidden_states: list[torch.Tensor]
    sizes: torch.Tensor
    source_map: torch.Tensor
    source_maps: list[torch.Tensor]

    def unmerged(self, index: int) -> torch.Tensor:
        """``hidden_states[index]`` read back per original token ``[B, P + N, D]`` (each reads its merged token)."""
        h, src = self.hidden_states[index], self.source_maps[index]
        return h.gather(1, src[..., None].expand(-1, -1, h.shape[-1]))


def merged_block(blk: nn.Module, x: torch.Tensor, sizes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The attention half of a timm ``Block`` with proportional attention; returns ``(x, metric, finish)``.

    Args:
        blk: A timm ``Block`` (``norm1``, ``attn``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``,
            ``drop_path2``).
        x: ``[B, T, D]`` block input.
        sizes: ``[B, T]`` token sizes for proportional attention, or None (plain attention).

    Returns:
        ``x`` after the attention residual ``[B, T, D]``, the merging metric (keys averaged over heads,
        ``[B, T, d_head]``) and ``finish(x) -> x + MLP`` for the (merged) tokens.
    """
    attn = blk.attn
    if getattr(attn, "gate", None) is not None:
        raise PruningError("tower merging does not support timm's gated attention; use a plain ViT block")
    qkv = attn.qkv(blk.norm1(x))
    q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=attn.num_heads)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None
    if sizes is not None:  # ToMe's proportional attention: a merged key counts as many times as its size
        bias = sizes.log().to(q.dtype)[:, None, None, :]  # [B, 1, 1, T]
    drop = attn.attn_drop.p if attn.training else 0.0
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)  # scale 1/sqrt(d) as timm
    o = attn.proj_drop(attn.proj(attn.norm(rearrange(o, "b h t d -> b t (h d)"))))
    x = x + blk.drop_path1(blk.ls1(o))

    def finish(y: torch.Tensor) -> torch.Tensor:
        return y + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y))))

    return x, k.mean(dim=1), finish


def merged_blocks(
    blocks: nn.ModuleList | list[nn.Module], x: torch.Tensor, config: TowerMergeConfig, num_prefix: int
) -> TowerMergeOutput:
    """Run ``blocks`` on the embeddings ``x [B, P + N, D]`` merging ``config.r`` tokens in each block.

    Args:
        blocks: timm ``Block`` s.
        x: ``[B, P + N, D]`` with ``num_prefix`` prefix tokens ([CLS], registers) first.
        config: What to merge.
        num_prefix: Prefix tokens, which never merge (ToMe: 0 or 1).
    """
    if config.method == "tome" and num_prefix > 1:
        raise PruningError(
            f"ToMe protects one class token and this tower has {num_prefix} prefix tokens; use method='pitome', "
            "which protects every prefix token"
        )
    b, t, _ = x.shape
    dev = x.device
    sizes = torch.ones(b, t, dtype=x.dtype, device=dev)
    source = torch.arange(t, device=dev).expand(b, -1).clone()
    states, maps = [x], [source]
    merged = False
    depth = len(blocks)
    for i, blk in enumerate(blocks):
        # sizes are all 1 until something merged: plain attention there (bias 0 would change nothing)
        x, metric, finish = merged_block(blk, x, sizes if config.prop_attn and merged else None)
        r = config.r_at(i, x.shape[1] - num_prefix)
        if r > 0 and x.shape[1] - num_prefix >= 2:
            stable = not config.reference
            if config.method == "tome":
                assign, t_new = tome_step(metric, r, num_prefix, stable=stable)
            else:
                margin = config.margin(i, depth)
                assign, t_new = pitome_step(metric, r, num_prefix, margin, config.alpha, stable=stable)
            if t_new < x.shape[1]:
                x, sizes = merge_wavg(x, sizes, assign, t_new)
                source = assign.gather(1, source)
                merged = True
                if not config.reference:  # raster order (prefix tokens stay first: their first source is smallest)
                    x, sizes, source = reorder(x, sizes, source, first_sources(source, t_new).argsort(dim=1))
        x = finish(x)
        states.append(x)
        maps.append(source)
    return TowerMergeOutput(states, sizes, source, maps)


def _embed(tower: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, nn.ModuleList, int]:
    """Embeddings ``[B, P + N, D]``, blocks and prefix count of an mmtok tower (timm or mmtok ViT) or a bare ViT."""
    m = getattr(tower, "model", tower)
    if hasattr(m, "_pos_embed") and hasattr(m, "patch_embed"):  # timm VisionTransformer
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pixel_values))))
        return x, m.blocks, int(m.num_prefix_tokens)
    if hasattr(m, "embed_patches") and hasattr(m, "_with_cls"):  # mmtok's ViT encoder
        return m._with_cls(m.embed_patches(pixel_values)), m.blocks, int(m.num_prefix_tokens)
    raise PruningError(
        f"tower merging runs timm ViTs and mmtok's ViT encoder (timm_vit / mmtok_vit towers); got {type(m).__name__}"
    )


def tower_hidden_states(tower: nn.Module, pixel_values: torch.Tensor, config: TowerMergeConfig) -> TowerMergeOutput:
    """The merged run of a vision tower (``timm_vit``/``mmtok_vit`` tower, a timm ViT or mmtok's ViT encoder).

    Args:
        tower: The tower.
        pixel_values: ``[B, C, H, W]`` as the tower's own ``hidden_states`` takes them (normalised).
        config: What to merge.
    """
    x, blocks, prefix = _embed(tower, pixel_values)
    return merged_blocks(blocks, x, config, prefix)


@contextlib.contextmanager
def merging_tower(tower: nn.Module, config: TowerMergeConfig) -> Iterator[dict[str, Any]]:
    """Within the block, ``tower.hidden_states`` runs merged and returns per-patch states (usual shapes).

    Every hidden state ``[B, P + N, D]`` is read back per original token through the source map of its block, so an
    MLLM built on the tower works unchanged while the tower's blocks run on fewer tokens. The yielded dict gets
    ``"last"``: the :class:`TowerMergeOutput` of the latest call (sizes and source map, e.g. for overlays).
    """
    if not hasattr(tower, "hidden_states"):
        raise PruningError(
            "merging_tower needs an mmtok vision tower (with hidden_states); got " + type(tower).__name__
        )
    info: dict[str, Any] = {}

    def hidden_states(pixel_values: torch.Tensor) -> list[torch.Tensor]:
        out = tower_hidden_states(tower, pixel_values, config)
        info["last"] = out
        return [out.unmerged(i) for i in range(len(out.hidden_states))]

    # an instance attribute shadows the class method for this block only (the tower's own code is untouched)
    tower.hidden_states = hidden_states
    try:
        yield info
    finally:
        del tower.hidden_states

"""Byte-pair encoding over visual code grids, truly two-dimensional.

Paper: "From Pixels to Tokens: Byte-Pair Encoding on Quantized Visual Modalities" (Being-VL,
arXiv:2410.02155). Reference implementation: the authors' release, which counts horizontal,
vertical and diagonal pairs in a dense V x V matrix rebuilt at every merge.

What mmtok does differently (see REFERENCES.md section 1.4):

* Pairs are horizontal *and* vertical neighbours for every merge (the reference flattens the grid
  after the first merge, so every later merge is 1D). Identical-code pairs (the most common ones in
  flat regions) may be merged; the reference only allows ``id1 < id2``.
* Training is incremental: pair counts, an occurrence index (pair -> anchor cells) and a lazy
  max-heap. A merge only touches the occurrences of the chosen pair and their neighbours, never
  recounts the corpus. The input is never mutated. Two trainers learn exactly the same merges:
  the compiled kernel in ``_bpe_fast.py`` (numba; applies occurrences one at a time, ~15 us per late
  merge) and the numpy reference here (each merge one vectorised batch, ~0.15 ms of fixed cost per
  merge), which the kernel is tested against and which runs when numba does not import.
* ``encode`` replays the learned merges in learned order (exactly the segmentation training
  produced on the training grids); ``decode`` paints every token back and is lossless on every grid,
  including codes never seen in training (all base codes are in the vocabulary).

Token geometry. Every token is an axis-aligned *rectangle* of base codes. A base code is 1x1. A
horizontal merge ``(a, b, "h")`` joins ``a`` (h x w1) with the token ``b`` (h x w2) anchored exactly
at ``a``'s right edge and on the same top row, giving h x (w1 + w2); a vertical merge ``(a, b, "v")``
joins ``a`` (h1 x w) with ``b`` (h2 x w) anchored exactly below it, giving (h1 + h2) x w. Pairs whose
heights (h) or widths (v) differ are not candidates, so a segmentation is always a tiling of the grid
by rectangles. A merged token is stored as its merge rule (left/top child, right/bottom child,
direction); its shape and its code pattern (the h x w array of base codes) follow recursively, and
:meth:`BPEVocab.render` returns that pattern.

Sequence order. ``encode`` lists a grid's tokens in raster order of their top-left cell (anchor).
Given the grid shape this order alone is enough to decode: the next token's anchor is always the
first cell not yet covered (every cell before it belongs to a token whose anchor comes earlier).

Greedy rule. A merge is applied to all its occurrences in raster order of the first token's anchor;
when ``a == b`` occurrences can overlap (``a a a``): along such a chain the 1st, 3rd, ... occurrences
are taken, like 1D BPE scanning left to right.

1D mode (``mode="1d"``): only horizontal pairs within a row; with one row per word this is classic BPE
and is what the benchmark compares with HF ``tokenizers``. 1D sequences (e.g. 1D tokenizer ids) are
treated as 1 x K grids.

Ids for an MLLM (:class:`ImageTokenLayout`): base codes ``0..C-1``, merged tokens ``C..C+M-1``, then
``<boi>`` = ``C+M`` and ``<eoi>`` = ``C+M+1``; all shifted by ``offset`` (the text vocabulary size) in
the LLM's id space.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

VOCAB_FORMAT = "mmtok-bpe"
VOCAB_VERSION = 1
DIRS = ("h", "v")
BACKENDS = ("auto", "numba", "python")
_FAST_WARNED = False  # the "numba missing" warning is logged once per process


class BPEError(ValueError):
    """Bad input to the BPE trainer, encoder or decoder (the message says what to fix)."""


# ----------------------------------------------------------------------------------------------
# Grid state shared by the trainer and the encoder
# ----------------------------------------------------------------------------------------------
class _Grids:
    """All grids of a corpus concatenated into flat cell arrays, plus the current tiling.

    ``tok[g]`` is the token anchored at cell ``g`` (-1 when ``g`` is covered by another token's
    rectangle), ``owner[g]`` the anchor of the token covering ``g``. ``th``/``tw`` give every token's
    height/width. A pair occurrence is identified by its first token's anchor and a direction.
    """

    def __init__(self, grids: list[np.ndarray], th: np.ndarray, tw: np.ndarray, vmax: int, two_d: bool):
        self.th, self.tw, self.vmax, self.two_d = th, tw, vmax, two_d
        self.shapes = [g.shape for g in grids]
        sizes = np.array([g.size for g in grids], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.tok = np.concatenate([g.reshape(-1) for g in grids]).astype(np.int64)
        n = self.tok.size
        self.owner = np.arange(n, dtype=np.int64)
        # per-cell row/col and the height/width of the grid the cell belongs to
        self.row = np.empty(n, np.int64)
        self.col = np.empty(n, np.int64)
        self.gh = np.empty(n, np.int64)
        self.gw = np.empty(n, np.int64)
        if len(set(self.shapes)) == 1 and grids:  # fast path: one shape
            h, w = self.shapes[0]
            idx = np.arange(h * w)
            self.row[:] = np.tile(idx // w, len(grids))
            self.col[:] = np.tile(idx % w, len(grids))
            self.gh[:], self.gw[:] = h, w
        else:
            for (h, w), o in zip(self.shapes, self.offsets[:-1]):
                idx = np.arange(h * w)
                self.row[o : o + h * w], self.col[o : o + h * w] = idx // w, idx % w
                self.gh[o : o + h * w], self.gw[o : o + h * w] = h, w

    # -- neighbours of anchors ``s`` holding tokens ``ts`` (vectorised) -> (valid, other anchor, other token)
    def right(self, s: np.ndarray, ts: np.ndarray):
        w = self.tw[ts]
        ok = self.col[s] + w < self.gw[s]
        g2 = np.where(ok, s + w, s)
        t2 = self.tok[g2]
        ok &= (t2 >= 0) & (self.th[t2] == self.th[ts])  # th[-1] is read for t2 == -1 but masked out
        return ok, g2, t2

    def below(self, s: np.ndarray, ts: np.ndarray):
        h = self.th[ts]
        ok = self.row[s] + h < self.gh[s]
        g2 = np.where(ok, s + h * self.gw[s], s)
        t2 = self.tok[g2]
        ok &= (t2 >= 0) & (self.tw[t2] == self.tw[ts])
        return ok, g2, t2

    def left(self, s: np.ndarray, ts: np.ndarray):
        ok = self.col[s] > 0
        g1 = self.owner[np.where(ok, s - 1, s)]  # anchor of the token covering the cell to the left
        t1 = self.tok[g1]
        ok &= (self.row[g1] == self.row[s]) & (self.th[t1] == self.th[ts])
        return ok, g1, t1

    def up(self, s: np.ndarray, ts: np.ndarray):
        ok = self.row[s] > 0
        g1 = self.owner[np.where(ok, s - self.gw[s], s)]
        t1 = self.tok[g1]
        ok &= (self.col[g1] == self.col[s]) & (self.tw[t1] == self.tw[ts])
        return ok, g1, t1

    def key(self, a: np.ndarray, b: np.ndarray, d: int) -> np.ndarray:
        return (a * self.vmax + b) * 2 + d

    def all_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Every current pair occurrence: (first anchors, keys)."""
        s = np.flatnonzero(self.tok >= 0)
        ts = self.tok[s]
        anchors, keys = [], []
        for d, fn in enumerate((self.right, self.below)[: 2 if self.two_d else 1]):
            ok, _, t2 = fn(s, ts)
            anchors.append(s[ok])
            keys.append(self.key(ts[ok], t2[ok], d))
        return np.concatenate(anchors), np.concatenate(keys)

    def select(self, cand: np.ndarray, a: int, b: int, d: int) -> tuple[np.ndarray, np.ndarray]:
        """Valid, non-overlapping occurrences of pair (a, b, d) among candidate anchors (greedy, raster order)."""
        p = np.unique(cand)
        p = p[self.tok[p] == a]  # a stale anchor (merged since it was indexed) no longer holds a
        q = p + (self.tw[a] if d == 0 else self.th[a] * self.gw[p])  # in range: it was valid when indexed
        ok = self.tok[q] == b
        p, q = p[ok], q[ok]
        if a == b and p.size > 1:
            # overlapping chains a a a ...: occurrence i's predecessor is the one whose second token is i's first
            pi = np.clip(np.searchsorted(p, p - (q - p)), 0, p.size - 1)
            has_pred = (p[pi] == p - (q - p)) & (q[pi] == p)
            depth = np.where(has_pred, -1, 0)
            while (depth < 0).any():  # iterations = longest chain (<= grid side)
                m = (depth < 0) & (depth[pi] >= 0)
                depth[m] = depth[pi[m]] + 1
            keep = depth % 2 == 0
            p, q = p[keep], q[keep]
        return p, q

    def destroyed(self, p: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Keys (with repetition) of every pair occurrence touching the tokens at ``p`` or ``q``."""
        s = np.concatenate([p, q])
        ts = self.tok[s]
        codes, keys = [], []
        fns = [(self.right, 0, True), (self.left, 0, False)]
        if self.two_d:
            fns += [(self.below, 1, True), (self.up, 1, False)]
        for fn, d, first in fns:
            ok, g, t = fn(s, ts)
            if first:
                codes.append(s[ok] * 2 + d)
                keys.append(self.key(ts[ok], t[ok], d))
            else:
                codes.append(g[ok] * 2 + d)
                keys.append(self.key(t[ok], ts[ok], d))
        codes_all = np.concatenate(codes)
        _, first_idx = np.unique(codes_all, return_index=True)  # an occurrence seen from both ends counts once
        return np.concatenate(keys)[first_idx]

    def apply(self, p: np.ndarray, q: np.ndarray, b: int, t: int) -> None:
        """Merge the tokens at ``q`` (all holding ``b``) into the tokens at ``p``, which become ``t``."""
        hb, wb = int(self.th[b]), int(self.tw[b])
        rr, cc = np.divmod(np.arange(hb * wb), wb)
        cells = q[:, None] + rr[None, :] * self.gw[q][:, None] + cc[None, :]
        self.owner[cells] = p[:, None]
        self.tok[q] = -1
        self.tok[p] = t

    def created(self, p: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Pair occurrences involving the new tokens ``t`` at ``p``: (first anchors, keys)."""
        ts = np.full(p.shape, t, dtype=np.int64)
        anchors, keys = [], []
        fns = [(self.right, 0, True), (self.left, 0, False)]
        if self.two_d:
            fns += [(self.below, 1, True), (self.up, 1, False)]
        for fn, d, first in fns:
            ok, g, other = fn(p, ts)
            if first:
                anchors.append(p[ok])
                keys.append(self.key(ts[ok], other[ok], d))
            else:
                ok &= other != t  # (t, t) pairs are already counted from their first token
                anchors.append(g[ok])
                keys.append(self.key(other[ok], ts[ok], d))
        return np.concatenate(anchors), np.concatenate(keys)

    def sequences(self) -> list[np.ndarray]:
        """Token ids per grid, in raster order of their anchors."""
        out = []
        for i in range(len(self.shapes)):
            seg = self.tok[self.offsets[i] : self.offsets[i + 1]]
            out.append(seg[seg >= 0].copy())
        return out


def _group(keys: np.ndarray, anchors: np.ndarray) -> tuple[list[int], list[np.ndarray]]:
    """Group anchors by key: (unique keys, anchor arrays)."""
    if keys.size == 0:
        return [], []
    order = np.argsort(keys, kind="stable")
    ks, an = keys[order], anchors[order]
    cuts = np.flatnonzero(np.diff(ks)) + 1
    return ks[np.concatenate([[0], cuts])].tolist(), np.split(an, cuts)


def as_int_ids(ids: Any, what: str) -> np.ndarray:
    """``ids`` (list, array or tensor) as a flat int64 array; non-integer input is an error, never truncated.

    A float id such as ``3.7`` (e.g. ids that went through a float tensor) would otherwise become ``3``
    and decode to a wrong grid without a word; an empty input is an empty int64 array.
    """
    arr = np.asarray(ids.detach().cpu().numpy() if hasattr(ids, "detach") else ids)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise BPEError(f"{what} must be integers, got dtype {arr.dtype}; pass token ids as an int array or list")
    return arr.astype(np.int64).reshape(-1)


def as_grids(grids: Any) -> list[np.ndarray]:
    """Normalise input to a list of 2D integer arrays.

    Accepts a ``[B, H, W]`` array/tensor, or a sequence of 2D ``[H, W]`` or 1D ``[K]`` arrays (a 1D
    sequence is a 1 x K grid).
    """
    if hasattr(grids, "detach"):  # torch tensor
        grids = grids.detach().cpu().numpy()
    if isinstance(grids, np.ndarray):
        if grids.ndim != 3:
            raise BPEError(
                f"expected a [B, H, W] batch of code grids, got an array of shape {grids.shape}; "
                "for one grid use encode_one(grid), for sequences pass a list of 1D arrays"
            )
        grids = list(grids)
    out = []
    for g in grids:
        g = np.asarray(g.detach().cpu().numpy() if hasattr(g, "detach") else g)
        if g.ndim == 1:
            g = g[None, :]
        if g.ndim != 2 or g.size == 0:
            raise BPEError(f"every grid must be a non-empty 2D [H, W] (or 1D [K]) array, got shape {g.shape}")
        if not np.issubdtype(g.dtype, np.integer):
            raise BPEError(f"code grids must hold integers, got dtype {g.dtype}")
        out.append(g)
    if not out:
        raise BPEError("no grids given")
    return out


# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageTokenLayout:
    """Where image tokens live in an MLLM's id space.

    Local ids: base codes ``[0, num_codes)``, merged tokens ``[num_codes, num_codes + num_merges)``,
    then ``boi`` and ``eoi``. Global (LLM) id = ``offset`` + local id, with ``offset`` usually the text
    vocabulary size, so ``size`` new embedding rows are appended after the text vocabulary.
    """

    num_codes: int
    num_merges: int
    offset: int = 0

    @property
    def boi(self) -> int:
        return self.offset + self.num_codes + self.num_merges

    @property
    def eoi(self) -> int:
        return self.boi + 1

    @property
    def size(self) -> int:
        """Number of ids the image vocabulary adds (codes + merges + <boi> + <eoi>)."""
        return self.num_codes + self.num_merges + 2

    def wrap(self, ids: np.ndarray | Sequence[int]) -> list[int]:
        """``[<boi>, offset + ids..., <eoi>]`` as LLM ids."""
        return [self.boi, *(int(i) + self.offset for i in as_int_ids(ids, "image token ids")), self.eoi]

    def unwrap(self, llm_ids: Sequence[int]) -> np.ndarray:
        """Inverse of :meth:`wrap`: local ids between the first ``<boi>`` and the next ``<eoi>``."""
        ids = as_int_ids(llm_ids, "LLM ids").tolist()
        if self.boi not in ids:
            raise BPEError("no <boi> token in the sequence; it holds no image")
        start = ids.index(self.boi) + 1
        end = ids.index(self.eoi, start) if self.eoi in ids[start:] else len(ids)
        local = np.asarray(ids[start:end], dtype=np.int64) - self.offset
        if local.size and (local.min() < 0 or local.max() >= self.num_codes + self.num_merges):
            raise BPEError("image span holds ids outside the image vocabulary")
        return local


class BPEVocab:
    """Learned merges plus everything derived from them (shapes, code patterns).

    Args:
        num_codes: Size of the base codebook C (ids ``0..C-1``).
        merges: ``[(a, b, "h"|"v"), ...]``; merge ``i`` creates token ``C + i``.
        mode: ``"2d"`` or ``"1d"``.
    """

    def __init__(self, num_codes: int, merges: Sequence[tuple[int, int, str]], mode: str = "2d"):
        if mode not in ("1d", "2d"):
            raise BPEError(f"mode must be '1d' or '2d', not {mode!r}")
        if num_codes < 1:
            raise BPEError("num_codes must be positive")
        self.num_codes, self.mode = int(num_codes), mode
        self.merges = [(int(a), int(b), str(d)) for a, b, d in merges]
        v = self.vocab_size
        self.th = np.ones(v, np.int64)
        self.tw = np.ones(v, np.int64)
        self.patterns: list[np.ndarray | None] = [None] * v  # lazily rendered
        for i, (a, b, d) in enumerate(self.merges):
            t = self.num_codes + i
            if not (0 <= a < t and 0 <= b < t) or d not in DIRS or (d == "v" and mode == "1d"):
                raise BPEError(f"merge {i} {(a, b, d)} is invalid (children must be earlier tokens, dir 'h'/'v')")
            if d == "h":
                if self.th[a] != self.th[b]:
                    raise BPEError(f"merge {i}: horizontal merge of tokens with heights {self.th[a]} != {self.th[b]}")
                self.th[t], self.tw[t] = self.th[a], self.tw[a] + self.tw[b]
            else:
                if self.tw[a] != self.tw[b]:
                    raise BPEError(f"merge {i}: vertical merge of tokens with widths {self.tw[a]} != {self.tw[b]}")
                self.th[t], self.tw[t] = self.th[a] + self.th[b], self.tw[a]
        self._keys = np.array(
            [(a * v + b) * 2 + DIRS.index(d) for a, b, d in self.merges], dtype=np.int64
        )  # key of merge i in the encoder's key space
        self._key_order = np.argsort(self._keys)

    @property
    def num_merges(self) -> int:
        return len(self.merges)

    @property
    def vocab_size(self) -> int:
        """Base codes + merged tokens (without <boi>/<eoi>)."""
        return self.num_codes + len(self.merges)

    def layout(self, text_vocab_size: int = 0) -> ImageTokenLayout:
        return ImageTokenLayout(self.num_codes, self.num_merges, offset=text_vocab_size)

    def token_shape(self, token: int) -> tuple[int, int]:
        """(height, width) in base cells of a token."""
        return int(self.th[token]), int(self.tw[token])

    def render(self, token: int) -> np.ndarray:
        """The ``[h, w]`` array of base codes a token stands for."""
        if not 0 <= token < self.vocab_size:
            raise BPEError(f"token {token} is outside the vocabulary [0, {self.vocab_size})")
        pat = self.patterns[token]
        if pat is None:
            if token < self.num_codes:
                pat = np.array([[token]], dtype=np.int64)
            else:
                a, b, d = self.merges[token - self.num_codes]
                pat = np.concatenate([self.render(a), self.render(b)], axis=1 if d == "h" else 0)
            self.patterns[token] = pat
        return pat

    # -- encode / decode ---------------------------------------------------------------------
    def _check_codes(self, grids: list[np.ndarray]) -> None:
        for g in grids:
            if g.min() < 0 or g.max() >= self.num_codes:
                raise BPEError(
                    f"grid holds codes in [{g.min()}, {g.max()}] but the vocabulary has {self.num_codes} base "
                    "codes; encode grids from the tokenizer this BPE was trained for"
                )

    def encode(self, grids: Any) -> list[np.ndarray]:
        """Segment grids with the learned merges, applied in learned order.

        Args:
            grids: ``[B, H, W]`` ints in ``[0, num_codes)`` or a list of 2D/1D arrays.

        Returns:
            One int64 array of token ids per grid, in raster order of the tokens' top-left cells.
        """
        grids = as_grids(grids)
        self._check_codes(grids)
        state = _Grids(grids, self.th, self.tw, self.vocab_size, two_d=self.mode == "2d")
        if not self.merges:
            return state.sequences()
        anchors, keys = state.all_pairs()
        rank = self._rank_of(keys)
        keep = rank >= 0
        occ: dict[int, np.ndarray] = {}
        ranks, groups = _group(rank[keep], anchors[keep])
        occ.update(zip(ranks, groups))
        heap = list(ranks)
        heapq.heapify(heap)
        c = self.num_codes
        while heap:
            r = heapq.heappop(heap)
            a, b, d = self.merges[r]
            p, q = state.select(occ.pop(r), a, b, DIRS.index(d))
            if p.size == 0:
                continue
            state.apply(p, q, b, c + r)
            new_anchors, new_keys = state.created(p, c + r)
            new_rank = self._rank_of(new_keys)
            keep = new_rank >= 0
            # a created pair involves token c + r, so its merge (if any) comes later and is new to the heap
            for rr, grp in zip(*_group(new_rank[keep], new_anchors[keep])):
                occ[rr] = grp
                heapq.heappush(heap, rr)
        return state.sequences()

    def _rank_of(self, keys: np.ndarray) -> np.ndarray:
        """Merge index of each pair key (-1 when the pair was never merged)."""
        if keys.size == 0 or not self.merges:
            return np.full(keys.shape, -1, np.int64)
        sorted_keys = self._keys[self._key_order]
        i = np.clip(np.searchsorted(sorted_keys, keys), 0, sorted_keys.size - 1)
        return np.where(sorted_keys[i] == keys, self._key_order[i], -1)

    def encode_one(self, grid: Any) -> np.ndarray:
        """Encode one ``[H, W]`` grid (or ``[K]`` sequence)."""
        return self.encode([grid])[0]

    def decode(self, ids: Any, shape: tuple[int, int] | int) -> np.ndarray:
        """Paint tokens back into a code grid (exact inverse of :meth:`encode`).

        Args:
            ids: Token ids of one grid in raster order of their anchors.
            shape: ``(H, W)`` of the grid (an int K for a 1 x K sequence).

        Returns:
            ``[H, W]`` int64 code grid (``[K]`` when ``shape`` is an int).

        Raises:
            BPEError: a non-integer id (floats are never truncated), an id outside the vocabulary, a token
                that does not fit, or too few/many tokens.
        """
        one_d = isinstance(shape, (int, np.integer))
        h, w = (1, int(shape)) if one_d else (int(shape[0]), int(shape[1]))
        ids = as_int_ids(ids, "token ids")
        out = np.full((h, w), -1, dtype=np.int64)
        flat = out.reshape(-1)
        pos = 0
        for i, t in enumerate(ids.tolist()):
            while pos < h * w and flat[pos] >= 0:
                pos += 1
            if pos >= h * w:
                raise BPEError(f"{len(ids)} tokens overfill a {h}x{w} grid (token {i} has no room)")
            pat = self.render(t)
            r, c = divmod(pos, w)
            ph, pw = pat.shape
            if r + ph > h or c + pw > w or (out[r : r + ph, c : c + pw] >= 0).any():
                raise BPEError(f"token {i} (id {t}, {ph}x{pw}) does not fit at ({r}, {c}) of a {h}x{w} grid")
            out[r : r + ph, c : c + pw] = pat
        if (flat < 0).any():
            raise BPEError(f"{len(ids)} tokens leave {int((flat < 0).sum())} cells of the {h}x{w} grid uncovered")
        return out[0] if one_d else out

    # -- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": VOCAB_FORMAT,
            "version": VOCAB_VERSION,
            "mode": self.mode,
            "num_codes": self.num_codes,
            "num_merges": self.num_merges,
            "merges": [[a, b, d] for a, b, d in self.merges],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the vocabulary as versioned JSON (atomic)."""
        from mmtok.hub import atomic_write_text

        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict()))
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BPEVocab:
        if data.get("format") != VOCAB_FORMAT:
            raise BPEError(f"not an mmtok BPE vocabulary (format {data.get('format')!r}, expected {VOCAB_FORMAT!r})")
        if data.get("version") != VOCAB_VERSION:
            raise BPEError(
                f"BPE vocabulary version {data.get('version')} is not supported (this mmtok reads {VOCAB_VERSION})"
            )
        return cls(data["num_codes"], [tuple(m) for m in data["merges"]], mode=data["mode"])

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPEVocab:
        path = Path(path)
        if not path.is_file():
            raise BPEError(f"BPE vocabulary {path} does not exist; train one with train_bpe(...).save(path)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BPEError(f"{path} is not valid JSON ({e})") from e
        return cls.from_dict(data)

    def __repr__(self) -> str:
        return f"BPEVocab(num_codes={self.num_codes}, num_merges={self.num_merges}, mode={self.mode!r})"


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------
@dataclass
class BPETrainStats:
    """What training did: tokens before/after, merge counts (frequency of each chosen pair)."""

    tokens_before: int
    tokens_after: int
    merge_counts: list[int]


def train_bpe(
    grids: Any,
    num_merges: int,
    *,
    num_codes: int | None = None,
    mode: str = "2d",
    min_frequency: int = 2,
    return_stats: bool = False,
    backend: str = "auto",
) -> BPEVocab | tuple[BPEVocab, BPETrainStats]:
    """Learn ``num_merges`` merges over code grids (incremental: counts + occurrence index + lazy heap).

    Args:
        grids: ``[B, H, W]`` ints or a list of 2D/1D int arrays (not modified).
        num_merges: Merges to learn; fewer are learned if no pair reaches ``min_frequency``.
        num_codes: Base codebook size C (default: max code + 1). All C codes are in the vocabulary.
        mode: ``"2d"`` (horizontal and vertical pairs) or ``"1d"`` (horizontal pairs within rows).
        min_frequency: Stop when the most frequent pair occurs fewer times (an integer >= 1; a pair must
            occur at least once to be merged, so 0 or less would mean the same as 1 and is refused).
        return_stats: Also return :class:`BPETrainStats`.
        backend: ``"numba"`` (the compiled kernel of ``_bpe_fast.py``), ``"python"`` (the numpy reference
            trainer, kept to test the kernel against) or ``"auto"`` (numba when it imports). Both learn exactly
            the same merges in the same order.

    Ties between equally frequent pairs go to the smallest key ``((a * V + b) * 2 + dir)`` with
    ``V = num_codes + num_merges``, so training is deterministic.
    """
    if mode not in ("1d", "2d"):
        raise BPEError(f"mode must be '1d' or '2d', not {mode!r}")
    if backend not in BACKENDS:
        raise BPEError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if isinstance(num_merges, bool) or not isinstance(num_merges, (int, np.integer)) or num_merges < 0:
        raise BPEError(f"num_merges must be an integer >= 0, got {num_merges!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, (int, np.integer)) or min_frequency < 1:
        raise BPEError(f"min_frequency must be an integer >= 1 (a pair must occur to be merged), got {min_frequency!r}")
    grids = as_grids(grids)
    max_code = max(int(g.max()) for g in grids)
    min_code = min(int(g.min()) for g in grids)
    num_codes = max_code + 1 if num_codes is None else int(num_codes)
    if min_code < 0 or max_code >= num_codes:
        raise BPEError(f"codes must lie in [0, num_codes={num_codes}), found [{min_code}, {max_code}]")
    c, vmax = num_codes, num_codes + num_merges
    th = np.ones(vmax, np.int64)
    tw = np.ones(vmax, np.int64)
    state = _Grids(grids, th, tw, vmax, two_d=mode == "2d")
    tokens_before = state.tok.size
    kernel, dense_max = (None, 0) if backend == "python" else _fast_kernel(required=backend == "numba")
    if kernel is not None:
        a, b, d, counts, m = kernel(
            state.tok, state.owner, state.row, state.col, state.gh, state.gw, th, tw,
            c, int(num_merges), int(min_frequency), mode == "2d", dense_max,
        )  # fmt: skip
        merges = [(x, y, DIRS[z]) for x, y, z in zip(a[:m].tolist(), b[:m].tolist(), d[:m].tolist())]
        merge_counts = counts[:m].tolist()
    else:
        merges, merge_counts = _train_reference(state, int(num_merges), int(min_frequency))
    if len(merges) < num_merges:
        logger.info("BPE stopped after %d merges: no pair occurs %d times", len(merges), min_frequency)
    vocab = BPEVocab(c, merges, mode=mode)
    if return_stats:
        return vocab, BPETrainStats(tokens_before, int((state.tok >= 0).sum()), merge_counts)
    return vocab


def _fast_kernel(required: bool):
    """The compiled kernel of ``_bpe_fast.py`` and its dense-table limit; (None, 0) when numba does not import."""
    global _FAST_WARNED
    try:
        from mmtok.tokenizers._bpe_fast import DENSE_MAX, train_kernel
    except ImportError as e:
        if required:
            raise BPEError(
                f"backend='numba' needs numba ({e}); install it (`make setup`) or use backend='python'"
            ) from e
        if not _FAST_WARNED:
            logger.warning("numba does not import (%s): BPE training falls back to the slower numpy trainer", e)
            _FAST_WARNED = True
        return None, 0
    return train_kernel, DENSE_MAX


def _train_reference(
    state: _Grids, num_merges: int, min_frequency: int
) -> tuple[list[tuple[int, int, str]], list[int]]:
    """The numpy reference trainer: counts + occurrence index + lazy heap, each merge applied as one batch.

    Every occurrence-level step is vectorised, so a merge costs ~100 numpy calls whatever its count (this
    fixed cost dominates from a few thousand merges on); the compiled kernel does the same work one
    occurrence at a time. Updates ``state`` (and its ``th``/``tw``) in place.

    Returns:
        (merges ``[(a, b, "h"|"v"), ...]``, count of each merge when it was chosen).
    """
    th, tw, vmax = state.th, state.tw, state.vmax
    c = vmax - num_merges

    # initial pairs: counts and occurrences of base-code pairs in CSR form (sorted by key)
    anchors, keys = state.all_pairs()
    order = np.argsort(keys, kind="stable")
    init_anchors = anchors[order]
    init_keys, starts, counts0 = np.unique(keys[order], return_index=True, return_counts=True)
    starts = np.append(starts, init_anchors.size)
    init_counts = counts0.copy()  # decremented as occurrences are destroyed
    # candidates from the initial pairs, best first; counts only ever decrease, so a lazy scan works
    init_order = np.lexsort((init_keys, -counts0))
    ptr = 0
    new_counts: dict[int, int] = {}
    new_occ: dict[int, np.ndarray] = {}
    heap: list[tuple[int, int]] = []

    def init_index(k: int) -> int:
        return int(np.searchsorted(init_keys, k))

    def current(k: int) -> int:
        return new_counts[k] if k in new_counts else int(init_counts[init_index(k)])

    merges: list[tuple[int, int, str]] = []
    merge_counts: list[int] = []
    while len(merges) < num_merges:
        # advance past stale initial entries (moving their true count to the heap)
        while ptr < init_order.size:
            i = init_order[ptr]
            if init_counts[i] == counts0[i]:
                break
            if init_counts[i] >= min_frequency:
                heapq.heappush(heap, (-int(init_counts[i]), int(init_keys[i])))
            ptr += 1
        while heap:
            negc, k = heap[0]
            cur = current(k)
            if cur == -negc:
                break
            heapq.heappop(heap)
            if cur >= min_frequency:
                heapq.heappush(heap, (-cur, k))
        cand = (-int(counts0[init_order[ptr]]), int(init_keys[init_order[ptr]])) if ptr < init_order.size else None
        if heap and (cand is None or heap[0] < cand):
            negc, k = heapq.heappop(heap)
        elif cand is not None:
            negc, k = cand
            ptr += 1
        else:
            break
        if -negc < min_frequency:
            break
        pair, d = divmod(k, 2)
        a, b = divmod(pair, vmax)
        if k in new_occ:
            occ = new_occ.pop(k)
        else:
            i = init_index(k)
            occ = init_anchors[starts[i] : starts[i + 1]]
        p, q = state.select(occ, a, b, d)
        t = c + len(merges)
        th[t], tw[t] = (th[a], tw[a] + tw[b]) if d == 0 else (th[a] + th[b], tw[a])
        # 1) every pair touching the merged tokens disappears
        dk, dc = np.unique(state.destroyed(p, q), return_counts=True)
        pa = (dk // 2) // vmax
        pb = (dk // 2) % vmax
        base = (pa < c) & (pb < c)
        if base.any():
            init_counts[np.searchsorted(init_keys, dk[base])] -= dc[base]
        for kk, cc in zip(dk[~base].tolist(), dc[~base].tolist()):
            new_counts[kk] -= cc
        # 2) merge, 3) pairs with the new token appear (they are all new keys)
        state.apply(p, q, b, t)
        for kk, grp in zip(*_group(*state.created(p, t)[::-1])):
            new_counts[kk] = grp.size
            new_occ[kk] = grp
            if grp.size >= min_frequency:
                heapq.heappush(heap, (-grp.size, kk))
        merges.append((a, b, DIRS[d]))
        merge_counts.append(-negc)
        assert current(k) == 0, "all occurrences of the merged pair must be consumed"
    return merges, merge_counts

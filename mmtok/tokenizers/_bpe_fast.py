"""Compiled (numba) kernel of the 2D BPE trainer in :mod:`mmtok.tokenizers.bpe`.

Paper: "From Pixels to Tokens: Byte-Pair Encoding on Quantized Visual Modalities" (Being-VL,
arXiv:2410.02155). Reference implementation: the authors' release (a dense V x V pair matrix rebuilt
at every merge). The data structures follow classic incremental BPE trainers (SentencePiece's and HF
``tokenizers``'): pair counts, per-pair occurrence lists and a lazy max-heap, here over a flat array
of grid cells instead of a list of words.

What this kernel does differently from the pure-Python trainer in ``bpe.py`` (which stays the
reference it is tested against, merge for merge):

* Occurrences of the chosen pair are applied one at a time, in raster order of their first token's
  anchor, each against the *current* tiling: first every pair touching the two tokens is removed
  from the counts, then the tokens merge, then every pair touching the new token is added. Because
  the counts always equal those of the current tiling, the result is the reference's batch update;
  the greedy rule for chains ``a a a`` (take the 1st, 3rd, ...) falls out of the in-place scan (the
  2nd occurrence's first token is already gone when it is reached).
* Pair keys ``(a * V + b) * 2 + dir`` map to dense pair ids: pairs of base codes through a
  ``C x C x dirs`` table, pairs with a merged token through an open-addressing hash table, and
  ``apid[anchor * dirs + dir]`` holds the id of the pair that starts there, so a pair that disappears
  is found without a lookup. Occurrence lists live in one pool array (a pair's list is written once,
  in the merge that creates its newer token: every occurrence of a pair is born in that merge and only
  dies afterwards, so an entry is either valid or stale forever and is checked when read).
* Counts of a pair only fall after the merge that created it, so the heap holds (count, key, id)
  entries that may be stale-high; a stale top is re-pushed with its true count (lazy heap). Ties go to
  the smallest key, exactly as in the reference.

The kernel is compiled on first use and cached on disk next to this file (``cache=True``), so only the
first process after an install or an edit pays the compile time (~10 s on a busy 2-core machine; loading
it from the cache takes ~0.3 s).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_EMPTY = -1  # empty slot of the hash table (keys are >= 0)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing multiplier
DENSE_MAX = 1 << 23  # base-pair id table: C * C * dirs entries (64 MiB) at most; a larger codebook uses the hash


# ----------------------------------------------------------------------------------------------
# Containers: open-addressing hash (key -> pair id), growable arrays, binary heap
# ----------------------------------------------------------------------------------------------
@njit(cache=True)
def _slot(hkeys, key):
    """Slot of ``key`` in the table, or of the empty slot where it would go (linear probing)."""
    mask = hkeys.size - 1
    i = np.int64((np.uint64(key) * _GOLDEN) >> np.uint64(32)) & mask
    while True:
        k = hkeys[i]
        if k == key or k == _EMPTY:
            return i
        i = (i + 1) & mask


@njit(cache=True)
def _rehash(hkeys, hvals):
    """The table at twice its size (kept at most half full so probes stay short)."""
    nk = np.full(hkeys.size * 2, _EMPTY, np.int64)
    nv = np.empty(hkeys.size * 2, np.int64)
    for i in range(hkeys.size):
        if hkeys[i] != _EMPTY:
            j = _slot(nk, hkeys[i])
            nk[j] = hkeys[i]
            nv[j] = hvals[i]
    return nk, nv


@njit(cache=True)
def _grown(arr, size, fill):
    """``arr`` copied into an array of ``size`` elements (the new tail set to ``fill``)."""
    out = np.full(size, fill, arr.dtype)
    out[: arr.size] = arr
    return out


@njit(cache=True)
def _before(c1, k1, c2, k2):
    """Heap order: higher count first, then smaller key (the reference's tie-break)."""
    return c1 > c2 or (c1 == c2 and k1 < k2)


@njit(cache=True)
def _heap_push(hc, hk, hp, size, c, k, p):
    """Push (count, key, pair id) onto a heap of ``size`` entries (capacity checked by the caller)."""
    i = size
    while i > 0:
        parent = (i - 1) >> 1
        if not _before(c, k, hc[parent], hk[parent]):
            break
        hc[i], hk[i], hp[i] = hc[parent], hk[parent], hp[parent]
        i = parent
    hc[i], hk[i], hp[i] = c, k, p
    return size + 1


@njit(cache=True)
def _heap_pop(hc, hk, hp, size):
    """Drop the top entry; returns the new size."""
    size -= 1
    c, k, p = hc[size], hk[size], hp[size]
    i = 0
    while True:
        child = 2 * i + 1
        if child >= size:
            break
        if child + 1 < size and _before(hc[child + 1], hk[child + 1], hc[child], hk[child]):
            child += 1
        if not _before(hc[child], hk[child], c, k):
            break
        hc[i], hk[i], hp[i] = hc[child], hk[child], hp[child]
        i = child
    if size > 0:
        hc[i], hk[i], hp[i] = c, k, p
    return size


# ----------------------------------------------------------------------------------------------
# Neighbours of the token anchored at cell s (-1 when there is no pair in that direction)
# ----------------------------------------------------------------------------------------------
@njit(cache=True)
def _right(s, tok, th, tw, col, gw):
    t = tok[s]
    w = tw[t]
    if col[s] + w >= gw[s]:
        return -1
    t2 = tok[s + w]
    if t2 < 0 or th[t2] != th[t]:  # the cell is covered by a taller token from above, or heights differ
        return -1
    return s + w


@njit(cache=True)
def _below(s, tok, th, tw, row, gw, gh):
    t = tok[s]
    h = th[t]
    if row[s] + h >= gh[s]:
        return -1
    g = s + h * gw[s]
    t2 = tok[g]
    if t2 < 0 or tw[t2] != tw[t]:
        return -1
    return g


@njit(cache=True)
def _left(s, tok, th, owner, row, col):
    if col[s] == 0:
        return -1
    g = owner[s - 1]  # anchor of the token covering the cell to the left
    if row[g] != row[s] or th[tok[g]] != th[tok[s]]:  # not top-aligned, or heights differ
        return -1
    return g


@njit(cache=True)
def _up(s, tok, tw, owner, row, col, gw):
    if row[s] == 0:
        return -1
    g = owner[s - gw[s]]
    if col[g] != col[s] or tw[tok[g]] != tw[tok[s]]:
        return -1
    return g


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
@njit(cache=True)
def train_kernel(tok, owner, row, col, gh, gw, th, tw, num_codes, num_merges, min_frequency, two_d, dense_max):
    """Learn up to ``num_merges`` merges in place over a flat tiling (see :class:`bpe._Grids`).

    Args:
        tok: ``[N]`` int64, the token anchored at each cell (base codes at the start; -1 = covered).
            Updated in place to the final tiling.
        owner: ``[N]`` int64, anchor of the token covering each cell (``arange(N)`` at the start).
        row, col: ``[N]`` int64 position of each cell in its grid.
        gh, gw: ``[N]`` int64 height/width of the grid each cell belongs to.
        th, tw: ``[num_codes + num_merges]`` int64 token heights/widths (ones); filled for new tokens.
        num_codes: C; merge ``m`` creates token ``C + m``.
        num_merges: M, the most merges to learn (also fixes the key space ``V = C + M``).
        min_frequency: Stop when the best pair occurs fewer times (>= 1).
        two_d: Horizontal and vertical pairs (else horizontal only, within rows).
        dense_max: Largest dense base-pair table (entries) to use; :data:`DENSE_MAX` in practice, 0 forces
            the hash table for base pairs too (as with a large codebook; tests use it).

    Returns:
        ``(a, b, d, counts, m)``: arrays of length M whose first ``m`` entries are the learned merges
        (left/top child, right/bottom child, direction 0 = h / 1 = v) and the count of each when chosen.
    """
    n = tok.size
    vmax = num_codes + num_merges
    ndir = 2 if two_d else 1

    # -- pair ids: per-id count / key / occurrence range in the pool. Pairs of base codes get their ids
    #    from a dense table (or, for a large codebook, the hash); pairs with a merged token from the hash
    #    table, which therefore only ever holds keys made during training
    hkeys = np.full(1 << 16, _EMPTY, np.int64)
    hvals = np.empty(1 << 16, np.int64)
    nhash = 0
    cap = 1 << 15
    pcount = np.zeros(cap, np.int64)
    pkey = np.zeros(cap, np.int64)
    npairs = 0
    dense = num_codes * num_codes * ndir <= dense_max
    base_pid = np.full(num_codes * num_codes * ndir if dense else 1, -1, np.int64)

    # -- initial pairs of base codes: count them, remember each occurrence's id, then lay the
    #    occurrences out per id (CSR); anchors are visited in increasing order, so each list is sorted.
    #    apid[s * ndir + d] is the id of the pair whose first token is anchored at s in direction d
    #    (kept current for every pair that exists: set when the pair appears, read when it disappears)
    apid = np.full(n * ndir, -1, np.int64)
    for s in range(n):
        for d in range(ndir):
            g = _right(s, tok, th, tw, col, gw) if d == 0 else _below(s, tok, th, tw, row, gw, gh)
            if g < 0:
                continue
            key = (tok[s] * vmax + tok[g]) * 2 + d
            if dense:
                pid = base_pid[(tok[s] * num_codes + tok[g]) * ndir + d]
            else:
                i = _slot(hkeys, key)
                pid = hvals[i] if hkeys[i] != _EMPTY else -1
            if pid < 0:
                if npairs == pcount.size:
                    pcount = _grown(pcount, 2 * pcount.size, 0)
                    pkey = _grown(pkey, 2 * pkey.size, 0)
                pid = npairs
                pkey[pid] = key
                npairs += 1
                if dense:
                    base_pid[(tok[s] * num_codes + tok[g]) * ndir + d] = pid
                else:
                    if 2 * (nhash + 1) > hkeys.size:
                        hkeys, hvals = _rehash(hkeys, hvals)
                    i = _slot(hkeys, key)
                    hkeys[i] = key
                    hvals[i] = pid
                    nhash += 1
            pcount[pid] += 1
            apid[s * ndir + d] = pid
    ostart = np.zeros(pcount.size, np.int64)
    oend = np.zeros(pcount.size, np.int64)
    total = 0
    for pid in range(npairs):
        ostart[pid] = total
        oend[pid] = total
        total += pcount[pid]
    occ = np.empty(max(total + total // 4, 1024), np.int64)
    nocc = total
    for j in range(n * ndir):
        pid = apid[j]
        if pid >= 0:
            occ[oend[pid]] = j // ndir
            oend[pid] += 1
    ninit = npairs  # ids below this have sorted occurrence lists
    base_pid = np.empty(0, np.int64)

    # -- heap of (count, key, id), best first; only pairs that can still be chosen
    hcap = max(npairs, 1024)
    hc = np.empty(hcap, np.int64)
    hk = np.empty(hcap, np.int64)
    hp = np.empty(hcap, np.int64)
    hsize = 0
    for pid in range(npairs):
        if pcount[pid] >= min_frequency:
            hsize = _heap_push(hc, hk, hp, hsize, pcount[pid], pkey[pid], pid)

    out_a = np.zeros(num_merges, np.int64)
    out_b = np.zeros(num_merges, np.int64)
    out_d = np.zeros(num_merges, np.int64)
    out_c = np.zeros(num_merges, np.int64)
    cpid = np.empty(4096, np.int64)  # pairs created by one merge: id and first anchor
    canc = np.empty(4096, np.int64)
    m = 0
    while m < num_merges:
        # lazy max: a top whose count fell since it was pushed goes back with its true count
        found = False
        while hsize > 0:
            pid = hp[0]
            cur = pcount[pid]
            if cur == hc[0]:
                found = True
                break
            key = hk[0]
            hsize = _heap_pop(hc, hk, hp, hsize)
            if cur >= min_frequency:
                hsize = _heap_push(hc, hk, hp, hsize, cur, key, pid)
        if not found or hc[0] < min_frequency:
            break
        pid, key, best = hp[0], hk[0], hc[0]
        hsize = _heap_pop(hc, hk, hp, hsize)
        pair, d = key // 2, key % 2
        a, b = pair // vmax, pair % vmax
        t = num_codes + m
        if d == 0:
            th[t], tw[t] = th[a], tw[a] + tw[b]
        else:
            th[t], tw[t] = th[a] + th[b], tw[a]
        hb, wb = th[b], tw[b]
        if a == b and pid >= ninit:
            # chains a a a: the greedy rule needs raster order. A new pair's list is in creation order, which
            # is already raster order (its first anchors are p, or the left/upper neighbour of p on p's own
            # row/column, and p rises); sorting (cheap on sorted input) keeps that from being load-bearing
            occ[ostart[pid] : oend[pid]].sort()

        ncb = 0
        np0 = npairs  # the pairs this merge creates get the ids np0, np0 + 1, ...
        for i in range(ostart[pid], oend[pid]):
            p = occ[i]
            if tok[p] != a:  # stale: p was merged since (or is the 2nd token of a taken a-a occurrence)
                continue
            q = p + tw[a] if d == 0 else p + th[a] * gw[p]  # in range: the occurrence was valid when listed
            if tok[q] != b:
                continue
            # room for the (at most 4) pairs the new token can make
            if 2 * (nhash + 4) > hkeys.size:
                hkeys, hvals = _rehash(hkeys, hvals)
            if npairs + 4 > pcount.size:
                size = 2 * pcount.size
                pcount, pkey = _grown(pcount, size, 0), _grown(pkey, size, 0)
                ostart, oend = _grown(ostart, size, 0), _grown(oend, size, 0)
            if ncb + 4 > cpid.size:
                cpid, canc = _grown(cpid, 2 * cpid.size, 0), _grown(canc, 2 * canc.size, 0)

            # 1) every pair touching the tokens at p or q disappears (each counted once); the geometry
            #    says whether a pair is there, apid which one it is
            pcount[pid] -= 1  # the occurrence itself
            g = _left(p, tok, th, owner, row, col)
            if g >= 0:
                pcount[apid[g * ndir]] -= 1
            if _right(q, tok, th, tw, col, gw) >= 0:
                pcount[apid[q * ndir]] -= 1
            if two_d:
                g = _up(p, tok, tw, owner, row, col, gw)
                if g >= 0:
                    pcount[apid[g * 2 + 1]] -= 1
                if _below(q, tok, th, tw, row, gw, gh) >= 0:
                    pcount[apid[q * 2 + 1]] -= 1
                if d == 0:  # q is p's right neighbour; p's lower and q's upper pairs remain
                    if _below(p, tok, th, tw, row, gw, gh) >= 0:
                        pcount[apid[p * 2 + 1]] -= 1
                    g = _up(q, tok, tw, owner, row, col, gw)
                    if g >= 0:
                        pcount[apid[g * 2 + 1]] -= 1
                else:  # q is below p; p's right and q's left pairs remain
                    if _right(p, tok, th, tw, col, gw) >= 0:
                        pcount[apid[p * 2]] -= 1
                    g = _left(q, tok, th, owner, row, col)
                    if g >= 0:
                        pcount[apid[g * 2]] -= 1

            # 2) merge: b's cells now belong to the token anchored at p
            gwp = gw[p]
            for r in range(hb):
                base = q + r * gwp
                for c in range(wb):
                    owner[base + c] = p
            tok[q] = -1
            tok[p] = t

            # 3) every pair touching the new token appears (all are new keys: they involve t)
            for nb in range(2 * ndir):
                if nb == 0:
                    g = _right(p, tok, th, tw, col, gw)
                    first, second, dd = p, g, 0
                elif nb == 1:
                    g = _left(p, tok, th, owner, row, col)
                    first, second, dd = g, p, 0
                elif nb == 2:
                    g = _below(p, tok, th, tw, row, gw, gh)
                    first, second, dd = p, g, 1
                else:
                    g = _up(p, tok, tw, owner, row, col, gw)
                    first, second, dd = g, p, 1
                if g < 0:
                    continue
                key2 = (tok[first] * vmax + tok[second]) * 2 + dd
                j = _slot(hkeys, key2)
                if hkeys[j] == _EMPTY:
                    hkeys[j] = key2
                    hvals[j] = npairs
                    pkey[npairs] = key2
                    pcount[npairs] = 0
                    ostart[npairs] = 0
                    oend[npairs] = 0
                    npairs += 1
                    nhash += 1
                npid = hvals[j]
                pcount[npid] += 1
                apid[first * ndir + dd] = npid
                cpid[ncb] = npid
                canc[ncb] = first
                ncb += 1

        if pcount[pid] != 0:
            raise AssertionError("BPE kernel: an occurrence of the merged pair survived the merge")
        out_a[m], out_b[m], out_d[m], out_c[m] = a, b, d, best
        m += 1

        # 4) list the new pairs' occurrences (a counting sort by id, creation order within an id) and offer
        #    the frequent ones to the heap; a new pair below min_frequency can never be chosen (its count
        #    only falls from here), so it gets no list
        if ncb == 0:
            continue
        nnew = npairs - np0
        seg = np.zeros(nnew, np.int64)
        for x in range(ncb):
            seg[cpid[x] - np0] += 1
        total = 0
        for x in range(nnew):
            if pcount[np0 + x] >= min_frequency:
                total += seg[x]
        if nocc + total > occ.size:
            occ = _grown(occ, max(2 * occ.size, nocc + total), 0)
        if hsize + nnew > hc.size:
            size = max(2 * hc.size, hsize + nnew)
            hc, hk, hp = _grown(hc, size, 0), _grown(hk, size, 0), _grown(hp, size, 0)
        for x in range(nnew):
            cp = np0 + x
            if pcount[cp] >= min_frequency:
                ostart[cp] = nocc
                oend[cp] = nocc
                nocc += seg[x]
                hsize = _heap_push(hc, hk, hp, hsize, pcount[cp], pkey[cp], cp)
        for x in range(ncb):
            cp = cpid[x]
            if pcount[cp] >= min_frequency:
                occ[oend[cp]] = canc[x]
                oend[cp] += 1
    return out_a, out_b, out_d, out_c, m

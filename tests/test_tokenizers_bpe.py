"""2D BPE over code grids: lossless round trips (property tests), incremental == full recount, compiled kernel ==
numpy reference trainer merge for merge, files, ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmtok.tokenizers.bpe import DIRS, BPEError, BPEVocab, _Grids, train_bpe


def recount_merges(grids, num_merges, num_codes, mode, min_frequency=2):
    """Reference trainer: recount every pair of the corpus at every merge (same tie-break)."""
    vmax = num_codes + num_merges
    th, tw = np.ones(vmax, np.int64), np.ones(vmax, np.int64)
    state = _Grids([np.asarray(g) for g in grids], th, tw, vmax, two_d=mode == "2d")
    merges = []
    for m in range(num_merges):
        anchors, keys = state.all_pairs()
        if keys.size == 0:
            break
        uk, inv = np.unique(keys, return_inverse=True)
        counts = np.bincount(inv)
        best = int(np.argmax(counts))
        if counts[best] < min_frequency:
            break
        pair, d = divmod(int(uk[best]), 2)
        a, b = divmod(pair, vmax)
        p, q = state.select(anchors[inv == best], a, b, d)
        t = num_codes + m
        th[t], tw[t] = (th[a], tw[a] + tw[b]) if d == 0 else (th[a] + th[b], tw[a])
        state.apply(p, q, b, t)
        merges.append((a, b, DIRS[d]))
    return merges


def smooth_grids(rng, n, h, w, codes):
    """Grids with flat regions and repeated structure, like real VQ codes."""
    base = rng.integers(0, codes, size=(n, h // 2 + 1, w // 2 + 1))
    g = np.repeat(np.repeat(base, 2, axis=1), 2, axis=2)[:, :h, :w]
    noise = rng.random((n, h, w)) < 0.2
    return np.where(noise, rng.integers(0, codes, size=(n, h, w)), g)


@pytest.mark.parametrize("backend", ["numba", "python"])
@pytest.mark.parametrize("mode", ["2d", "1d"])
def test_incremental_trainer_equals_full_recount(mode, backend):
    rng = np.random.default_rng(0)
    grids = smooth_grids(rng, 40, 8, 8, 6)
    vocab = train_bpe(grids, 60, num_codes=6, mode=mode, backend=backend)
    assert vocab.merges == recount_merges(grids, 60, 6, mode)
    assert vocab.num_merges > 20


@st.composite
def corpora(draw):
    """A few grids of mixed shapes (1D sequences too) over a tiny codebook: many ties, chains and flat runs."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    codes = draw(st.integers(1, 5))
    grids = []
    for _ in range(draw(st.integers(1, 8))):
        h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        if draw(st.booleans()):  # flat 2x2 blocks with noise, like real VQ codes
            g = smooth_grids(rng, 1, h, w, codes)[0]
        else:
            g = rng.integers(0, codes, size=(h, w))
        grids.append(g[0] if h == 1 and draw(st.booleans()) else g)
    return grids, codes


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    corpus=corpora(),
    num_merges=st.integers(0, 50),
    min_frequency=st.integers(1, 3),
    mode=st.sampled_from(["1d", "2d"]),
)
def test_compiled_kernel_equals_numpy_reference(corpus, num_merges, min_frequency, mode):
    """Same merges in the same order (ties included), same counts, same final tiling; the input is untouched."""
    grids, codes = corpus
    kept = [g.copy() for g in grids]
    kw = dict(num_codes=codes + 1, mode=mode, min_frequency=min_frequency, return_stats=True)
    fast, fast_stats = train_bpe(grids, num_merges, backend="numba", **kw)
    ref, ref_stats = train_bpe(grids, num_merges, backend="python", **kw)
    assert fast.merges == ref.merges
    assert fast_stats == ref_stats
    assert all(np.array_equal(g, k) for g, k in zip(grids, kept))
    enc = fast.encode(grids)
    assert sum(len(e) for e in enc) == fast_stats.tokens_after


@pytest.mark.parametrize("mode", ["1d", "2d"])
def test_compiled_kernel_equals_reference_on_larger_seeded_corpus(mode):
    """A corpus big enough for long chains, hundreds of merges and counts that fall to min_frequency."""
    rng = np.random.default_rng(7)
    grids = list(smooth_grids(rng, 120, 12, 12, 16)) + [rng.integers(0, 16, size=(5, 17)) for _ in range(20)]
    grids.append(np.zeros((16, 16), np.int64))  # one flat grid: a a a ... chains in both directions
    fast, fast_stats = train_bpe(grids, 600, num_codes=16, mode=mode, backend="numba", return_stats=True)
    ref, ref_stats = train_bpe(grids, 600, num_codes=16, mode=mode, backend="python", return_stats=True)
    assert fast.merges == ref.merges and fast_stats == ref_stats
    assert fast.num_merges > 300
    assert fast_stats.merge_counts[-1] >= 2


@pytest.mark.parametrize("mode", ["1d", "2d"])
def test_compiled_kernel_hash_path_for_large_codebooks_equals_reference(mode):
    """``dense_max=0``: base pairs take the hash table, as they do for a codebook too large for the dense table."""
    from mmtok.tokenizers._bpe_fast import train_kernel

    rng = np.random.default_rng(3)
    grids = list(smooth_grids(rng, 60, 10, 10, 12))
    ref, ref_stats = train_bpe(grids, 200, num_codes=12, mode=mode, backend="python", return_stats=True)
    th, tw = np.ones(12 + 200, np.int64), np.ones(12 + 200, np.int64)
    state = _Grids(grids, th, tw, 12 + 200, two_d=mode == "2d")
    a, b, d, counts, m = train_kernel(
        state.tok, state.owner, state.row, state.col, state.gh, state.gw, th, tw, 12, 200, 2, mode == "2d", 0
    )
    assert [(x, y, DIRS[z]) for x, y, z in zip(a[:m].tolist(), b[:m].tolist(), d[:m].tolist())] == ref.merges
    assert counts[:m].tolist() == ref_stats.merge_counts and int((state.tok >= 0).sum()) == ref_stats.tokens_after


def test_without_numba_auto_falls_back_to_the_reference_and_numba_backend_says_what_to_do(monkeypatch, caplog):
    import sys

    import mmtok.tokenizers.bpe as bpe_module

    grids = smooth_grids(np.random.default_rng(4), 10, 6, 6, 5)
    expected = train_bpe(grids, 15, num_codes=5).merges
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now raises ImportError, as when not installed
    monkeypatch.delitem(sys.modules, "mmtok.tokenizers._bpe_fast", raising=False)
    monkeypatch.setattr(bpe_module, "_FAST_WARNED", False)
    with caplog.at_level("WARNING", logger="mmtok.tokenizers.bpe"):
        assert train_bpe(grids, 15, num_codes=5).merges == expected
    assert "falls back to the slower numpy trainer" in caplog.text
    with pytest.raises(BPEError, match="needs numba"):
        train_bpe(grids, 15, num_codes=5, backend="numba")


def test_unknown_backend_is_refused():
    with pytest.raises(BPEError, match="backend must be one of"):
        train_bpe(np.zeros((2, 3, 3), np.int64), 2, backend="rust")


def test_2d_merges_include_vertical_and_identical_pairs_and_encode_reproduces_training():
    rng = np.random.default_rng(1)
    grids = smooth_grids(rng, 50, 12, 10, 8)
    vocab, stats = train_bpe(grids, 80, num_codes=8, return_stats=True)
    dirs = {d for _, _, d in vocab.merges}
    assert dirs == {"h", "v"}
    assert any(a == b for a, b, _ in vocab.merges)  # identical-code pairs are merged (flat regions)
    assert any(min(vocab.token_shape(t)) > 1 for t in range(vocab.vocab_size))  # true 2D (h, w >= 2) tokens
    enc = vocab.encode(grids)
    assert sum(len(e) for e in enc) == stats.tokens_after < grids.size
    for e, g in zip(enc, grids):
        assert np.array_equal(vocab.decode(e, g.shape), g)
    assert grids.min() >= 0  # input untouched: training never mutates its input
    assert np.array_equal(grids, smooth_grids(np.random.default_rng(1), 50, 12, 10, 8))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    codes=st.integers(1, 5),
    mode=st.sampled_from(["1d", "2d"]),
)
def test_roundtrip_property_on_random_grids(seed, h, w, codes, mode):
    rng = np.random.default_rng(seed)
    train = smooth_grids(rng, 20, 8, 8, codes)
    vocab = train_bpe(train, 40, num_codes=codes + 2, mode=mode)  # codes+2: some codes never seen in training
    grids = [rng.integers(0, codes + 2, size=(h, w)) for _ in range(3)] + [np.full((h, w), codes + 1)]
    for g, ids in zip(grids, vocab.encode(grids)):
        assert np.array_equal(vocab.decode(ids, (h, w)), g)
        assert len(ids) <= h * w


def test_1d_sequences_variable_sizes_and_vocab_file(tmp_path):
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, 4, size=rng.integers(3, 30)) for _ in range(50)]
    vocab = train_bpe(seqs, 30, num_codes=4, mode="1d")
    assert all(d == "h" for _, _, d in vocab.merges)
    path = vocab.save(tmp_path / "bpe.json")
    data = json.loads(path.read_text())
    assert data["format"] == "mmtok-bpe" and data["version"] == 1 and len(data["merges"]) == vocab.num_merges
    back = BPEVocab.load(path)
    assert back.merges == vocab.merges and back.mode == "1d"
    for s, ids in zip(seqs, back.encode(seqs)):
        assert np.array_equal(back.decode(ids, len(s)), s)
    data["version"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(BPEError, match="version 99"):
        BPEVocab.load(tmp_path / "bad.json")


def test_render_and_layout_ids():
    vocab = BPEVocab(3, [(0, 1, "h"), (3, 3, "v"), (2, 2, "h")])
    assert vocab.token_shape(4) == (2, 2)
    assert vocab.render(4).tolist() == [[0, 1], [0, 1]]
    grid = np.array([[0, 1, 2, 2], [0, 1, 0, 1]])
    ids = vocab.encode_one(grid)
    assert ids.tolist() == [4, 5, 3]  # raster order of anchors: (0,0) 2x2, (0,2) 1x2, (1,2) 1x2
    layout = vocab.layout(text_vocab_size=100)
    assert (layout.boi, layout.eoi, layout.size) == (106, 107, 8)
    llm = layout.wrap(ids)
    assert llm == [106, 104, 105, 103, 107]
    assert np.array_equal(vocab.decode(layout.unwrap([1, 2, *llm, 7]), grid.shape), grid)


def test_bad_inputs_raise_clear_errors():
    vocab = BPEVocab(3, [(0, 1, "h")])
    with pytest.raises(BPEError, match="base codes"):
        vocab.encode([np.array([[0, 5]])])
    with pytest.raises(BPEError, match="outside the vocabulary"):
        vocab.decode([7], (1, 1))
    with pytest.raises(BPEError, match="does not fit"):
        vocab.decode([3, 3], (1, 3))
    with pytest.raises(BPEError, match="uncovered"):
        vocab.decode([0], (1, 2))
    with pytest.raises(BPEError, match="horizontal merge"):
        BPEVocab(3, [(0, 1, "v"), (3, 2, "h")])
    with pytest.raises(BPEError, match=r"\[B, H, W\]"):
        vocab.encode(np.zeros((2, 2), dtype=int))


def test_decode_refuses_float_ids_instead_of_truncating():
    rng = np.random.default_rng(0)
    grids = smooth_grids(rng, 20, 4, 4, 6)
    vocab = train_bpe(grids, 12, num_codes=6)
    ids = vocab.encode_one(grids[0])
    assert np.array_equal(vocab.decode(ids, (4, 4)), grids[0])
    assert np.array_equal(vocab.decode(ids.tolist(), (4, 4)), grids[0])  # a list of ints is fine
    # ids that went through a float array: 3.7 used to decode as token 3, painting wrong codes silently
    for bad in (ids.astype(np.float64) + 0.7, ids.astype(np.float32), [float(i) for i in ids]):
        with pytest.raises(BPEError, match="must be integers"):
            vocab.decode(bad, (4, 4))
    layout = vocab.layout(text_vocab_size=100)
    with pytest.raises(BPEError, match="must be integers"):
        layout.wrap(ids.astype(np.float64) + 0.5)
    with pytest.raises(BPEError, match="must be integers"):
        layout.unwrap(np.asarray(layout.wrap(ids), dtype=np.float64))
    with pytest.raises(BPEError, match="uncovered"):  # no ids at all is not a dtype problem
        vocab.decode([], (4, 4))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_train_bpe_refuses_min_frequency_below_one(bad):
    grids = smooth_grids(np.random.default_rng(1), 5, 4, 4, 4)
    with pytest.raises(BPEError, match="min_frequency must be an integer >= 1"):
        train_bpe(grids, 4, num_codes=4, min_frequency=bad)
    with pytest.raises(BPEError, match="num_merges must be an integer >= 0"):
        train_bpe(grids, 2.5, num_codes=4)
    assert train_bpe(grids, 4, num_codes=4, min_frequency=1).num_merges == 4

"""Contract tests over every registered pruner, plus known-answer tests of DART, [CLS] and FastV scores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmtok import registries
from mmtok.mllm.modeling import MLLM
from mmtok.mllm.pruning import PruneContext

IMG = 120
N = 64  # tiny CLIP: 32 px, patch 4 -> 8 x 8 image tokens
PRUNERS = registries.get("pruner").list()


@pytest.fixture(scope="module")
def model() -> MLLM:
    torch.manual_seed(0)
    m = (
        registries.get("mllm")
        .create(
            "llava",
            llm={
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 128,
                "pad_token_id": 0,
                "eos_token_id": 2,
                "max_position_embeddings": 512,
            },
            image_token_id=IMG,
        )
        .eval()
    )
    with torch.no_grad():  # make the random model opinionated (non-uniform attention and logits)
        for p in m.parameters():
            if p.ndim > 1:
                p.mul_(3.0)
    return m


def _batch(n_prompts: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_prompts):
        pre = torch.randint(3, 100, (1 + i,), generator=g)
        post = torch.randint(3, 100, (4 + 2 * i,), generator=g)
        rows.append(torch.cat([pre, torch.tensor([IMG]), post]))
    length = max(len(r) for r in rows)
    ids = torch.zeros(n_prompts, length, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = r
        att[i, length - len(r) :] = 1
    images = torch.rand(n_prompts, 3, 32, 32, generator=g)
    return ids, att, images


def _make(name: str, **kw):
    return registries.get("pruner").create(name, **kw)


def _recording(pruner):
    calls = []
    orig = pruner.select

    def select(ctx):
        calls.append(orig(ctx))
        return calls[-1]

    pruner.select = select
    return calls


@pytest.mark.parametrize("name", PRUNERS)
def test_keep_all_is_identity(model, name):
    ids, att, images = _batch()
    with torch.no_grad():
        ref = model(ids, images, att).logits
        got = model(ids, images, att, pruner=_make(name, num_keep=N)).logits
    # keeping every token gathers the full sequence back: same logits at every real position
    assert got.shape == ref.shape
    valid = model.prepare(ids, att, images).key_valid
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [p for p in PRUNERS if p != "none"])
@pytest.mark.parametrize("k", [1, 7, 16])
def test_exactly_k_sorted_in_range(model, name, k):
    ids, att, images = _batch()
    pruner = _make(name, num_keep=k)
    calls = _recording(pruner)
    with torch.no_grad():
        out = model(ids, images, att, pruner=pruner)
    keep = calls[-1]
    assert keep.shape == (3, k)
    assert keep.min() >= 0 and keep.max() < N
    assert bool((keep[:, 1:] > keep[:, :-1]).all())
    assert out.image_mask.sum(1).tolist() == [k, k, k]
    # every text token survives, pads included
    assert out.logits.shape[1] == ids.shape[1] - 1 + N - (N - k)


@pytest.mark.parametrize("name", PRUNERS)
def test_seeded_determinism(model, name):
    ids, att, images = _batch()
    keeps = []
    for _ in range(2):
        pruner = _make(name, num_keep=10, seed=3)
        calls = _recording(pruner)
        with torch.no_grad():
            model(ids, images, att, pruner=pruner)
        keeps.append(calls[-1])
    assert torch.equal(keeps[0], keeps[1])


@pytest.mark.parametrize("name", PRUNERS)
def test_batch_equals_single_runs(model, name):
    ids, att, images = _batch()
    pruner = _make(name, keep_ratio=0.25)
    with torch.no_grad():
        full = model.generate(ids, images, att, pruner=pruner, max_new_tokens=4, min_new_tokens=4)
        batch_logits = model(ids, images, att, pruner=pruner, logits_to_keep=1).logits[:, -1]
        for i in range(3):
            v = att[i].bool()
            one = model.generate(
                ids[i : i + 1, v], images[i : i + 1], pruner=pruner, max_new_tokens=4, min_new_tokens=4
            )
            assert torch.equal(one.sequences[0], full.sequences[i]), (name, i)
            single = model(ids[i : i + 1, v], images[i : i + 1], pruner=pruner, logits_to_keep=1).logits[0, -1]
            torch.testing.assert_close(single, batch_logits[i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", PRUNERS)
def test_cached_generation_equals_recomputation(model, name):
    ids, att, images = _batch()
    pruner = _make(name, num_keep=12)
    with torch.no_grad():
        cached = model.generate(ids, images, att, pruner=pruner, max_new_tokens=6, min_new_tokens=6)
        plain = model.generate(ids, images, att, pruner=pruner, max_new_tokens=6, min_new_tokens=6, use_cache=False)
    assert torch.equal(cached.sequences, plain.sequences)
    assert cached.image_tokens_kept == 12 or name == "none"
    if name == "none":
        everything = torch.arange(N).expand(ids.shape[0], -1)
        assert cached.image_keep is None or torch.equal(cached.image_keep, everything)
    else:  # the keep set generate() reports is the one the forward pass applies
        assert cached.image_keep.shape == (ids.shape[0], 12)
        fwd = model(ids, images, att, pruner=pruner, logits_to_keep=1)
        kept_positions = torch.stack([fwd.keep_index[i][fwd.image_mask[i]] for i in range(ids.shape[0])])
        prep = model.prepare(ids, att, images)
        assert torch.equal(prep.image_positions.gather(1, cached.image_keep), kept_positions)


def test_in_llm_cache_lengths(model):
    """Layers before K cache every token; layers from K on cache only the kept ones."""
    ids, att, images = _batch()
    prep = model.prepare(ids, att, images)
    out, _ = model._run(prep, _make("dart", num_keep=8, layer=2), use_cache=True)
    lengths = [layer.keys.shape[2] for layer in out.state.cache.layers]
    full = ids.shape[1] - 1 + N
    assert lengths == [full, full, full - N + 8, full - N + 8]


def test_pruned_prefill_is_shorter_and_positions_are_original(model):
    ids, att, images = _batch(1)
    prep = model.prepare(ids, att, images)
    out, keep = model._run(prep, _make("cls_attention", num_keep=5), use_cache=False)
    assert out.hidden.shape[1] == ids.shape[1] - 1 + 5
    # kept tokens carry their original positions (gaps where image tokens were dropped)
    assert torch.equal(out.position_ids[0], prep.position_ids[0][out.keep_index[0]])
    assert out.position_ids[0, -1] == prep.position_ids[0, -1]


# ---------------------------------------------------------------------------------------------------------
# known-answer tests of the scores
# ---------------------------------------------------------------------------------------------------------
class _HiddenOnlyLLM(torch.nn.Module):
    """The two things DART reads from an LLM: ``model.norm`` (identity here) and nothing else."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.norm = torch.nn.Identity()


def test_dart_selects_least_duplicated_tokens():
    # 8 image tokens at sequence positions 1..8, text tokens at 0 and 9. Features: tokens 1-5 are copies of
    # direction e0 (duplicates), tokens 6, 7, 8 point elsewhere. Keys: token 1 has the largest key norm among
    # image tokens (image pivot) and text token 9 among text tokens.
    d = 4
    hidden = torch.zeros(1, 10, d)
    e = torch.eye(d)
    hidden[0, 1:6] = e[0]
    hidden[0, 6] = e[1]
    hidden[0, 7] = e[2]
    hidden[0, 8] = -e[0]
    hidden[0, 0] = e[3]
    hidden[0, 9] = e[0] + 0.01 * e[1]
    keys = torch.ones(1, 1, 10, d) * 0.1
    keys[0, 0, 1] = 5.0  # image pivot: token 1 (image index 0)
    keys[0, 0, 9] = 3.0  # text pivot: token 9
    ctx = PruneContext(
        num_image_tokens=8,
        llm=_HiddenOnlyLLM(),
        layer=2,
        hidden=hidden,
        image_positions=torch.arange(1, 9)[None],
        key_valid=torch.ones(1, 10, dtype=torch.bool),
        position_ids=torch.arange(10)[None],
    )
    ctx.lazy["prev_keys"] = lambda: keys
    pruner = _make("dart", num_keep=3, pivot_image=1, pivot_text=1)
    keep = pruner.select(ctx)
    # pivot image 0 kept; the remaining 2 split 1/1 over the two pivots: the image pivot (e0) picks the least
    # similar token, image 7 (-e0); the text pivot (~e0) then picks the least similar of the rest, image 5 or 6
    # (e1 has cos 0.01, e2 has 0): image 6 (e2).
    assert keep.tolist() == [[0, 6, 7]]
    # the reference keeps pivot_image + 2 * floor(3 / 2) = 3 here (reference_count is the older name of the mode)
    ref = _make("dart", num_keep=3, pivot_image=1, pivot_text=1, reference_count=True)
    assert ref.reference and ref.select(ctx).shape == (1, ref.budget(8)) == (1, 3)
    # guards: budget >= N keeps all; budget + pivots > N does not overflow
    assert _make("dart", num_keep=8).select(ctx).tolist() == [list(range(8))]
    assert _make("dart", num_keep=2, pivot_image=4).select(ctx).shape == (1, 2)
    big = _make("dart", num_keep=16, pivot_image=1, pivot_text=1, reference=True)  # 1 + 2 * 8 > 8: capped at N
    assert big.budget(8) == 8 and big.select(ctx).tolist() == [list(range(8))]


class _FixedQKTower(torch.nn.Module):
    """A vision tower whose block q/k are given: [CLS] + 4 patches, 2 heads."""

    num_prefix_tokens = 1

    def __init__(self, q, k):
        super().__init__()
        self.q, self.k = q, k

    def layer_qk(self, block, hidden_in):
        return self.q, self.k


def test_cls_attention_known_answer():
    # head 0: [CLS] looks at patch 2; head 1: at patch 3; patch 0/1 get little attention
    k = torch.zeros(1, 2, 5, 2)
    k[0, 0, 3, 0] = 10.0  # token 3 = patch 2
    k[0, 1, 4, 1] = 10.0  # token 4 = patch 3
    q = torch.zeros(1, 2, 5, 2)
    q[0, :, 0] = 1.0
    tower = _FixedQKTower(q, k)
    ctx = PruneContext(
        num_image_tokens=4,
        tower=tower,
        tower_hidden=[torch.zeros(1, 5, 2)] * 3,
        feature_block=1,
        image_features=torch.zeros(1, 4, 8),
    )
    pruner = _make("cls_attention", num_keep=2)
    scores = pruner.scores(ctx)
    expected_h0 = torch.softmax(torch.tensor([0.0, 0, 0, 10, 0]), 0)[1:]
    expected_h1 = torch.softmax(torch.tensor([0.0, 0, 0, 0, 10]), 0)[1:]
    torch.testing.assert_close(scores[0], (expected_h0 + expected_h1) / 2)
    assert pruner.select(ctx).tolist() == [[2, 3]]
    # VTC-CLS sums blocks 0..1: same q/k each block -> doubled scores, same choice
    torch.testing.assert_close(_make("vtc_cls", num_keep=2).scores(ctx), 2 * scores)


def test_cls_row_matches_eager_attention_timm():
    """The q/k-recomputed [CLS] row equals the eager attention map of a timm block."""
    from mmtok.mllm.towers import cls_attention_row

    tower = (
        registries.get("vision tower")
        .create("timm_vit", kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2})
        .eval()
    )
    assert all(b.attn.fused_attn for b in tower.model.blocks)  # SDPA stays on in the tower
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hs = tower.hidden_states(px)
        row = cls_attention_row(tower, hs, 1)
        blk = tower.model.blocks[1]
        x = blk.norm1(hs[1])
        qkv = blk.attn.qkv(x).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
        att = ((qkv[0] * blk.attn.scale) @ qkv[1].transpose(-1, -2)).softmax(-1)  # [B, H, T, T]
    torch.testing.assert_close(row, att[:, :, 0, 1:].mean(1))


def test_cls_row_without_cls_is_mean_received_attention():
    """SigLIP has no [CLS]: the score is the mean attention each patch receives."""
    from mmtok.mllm.towers import cls_attention_row

    tower = (
        registries.get("vision tower")
        .create(
            "hf_siglip",
            config={
                "image_size": 32,
                "patch_size": 8,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
            },
        )
        .eval()
    )
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        hs = tower.hidden_states(px)
        q, k = tower.layer_qk(0, hs[0])
        att = (q @ k.transpose(-1, -2)).softmax(-1)  # [1, H, 16, 16]
        row = cls_attention_row(tower, hs, 0)
    torch.testing.assert_close(row, att.mean(2).mean(1))
    assert tower.model.config._attn_implementation == "sdpa"
    # LLaVA's "default" strategy drops patch 0 of a SigLIP tower: the scores of the 15 tokens the LLM sees
    ctx = PruneContext(num_image_tokens=15, tower=tower, tower_hidden=hs, feature_block=0)
    scores = _make("cls_attention", num_keep=4).scores(ctx)
    torch.testing.assert_close(scores, row[:, 1:])


def test_fastv_row_matches_eager_attention(model):
    """FastV's last-token row (from q/k, SDPA kept) equals the eager attention weights of layer K-1."""
    import copy

    from transformers import AutoModelForCausalLM

    ids, att, images = _batch(1)
    pruner = _make("fastv", num_keep=8, layer=2)
    seen = {}

    def select(ctx):
        seen["row"] = ctx.get("last_attention")
        seen["hidden_in"] = ctx.hidden
        return type(pruner).select(pruner, ctx)

    pruner.select = select
    with torch.no_grad():
        model(ids, images, att, pruner=pruner)
        prep = model.prepare(ids, att, images)
        eager = AutoModelForCausalLM.from_config(copy.deepcopy(model.llm.config), attn_implementation="eager").eval()
        eager.load_state_dict(model.llm.state_dict())
        out = eager(inputs_embeds=prep.embeds, attention_mask=prep.key_valid.long(), output_attentions=True)
    ref = out.attentions[1][:, :, -1]  # layer K-1 = 1, last query row [B, H, L]
    torch.testing.assert_close(seen["row"], ref, atol=1e-5, rtol=1e-4)
    assert model.llm.config._attn_implementation == "sdpa"


def test_pool_averages_cells(model):
    pruner = _make("pool", num_keep=16)  # 8x8 grid -> 4x4 cells of 2x2
    feats = torch.arange(64, dtype=torch.float32).view(1, 64, 1)
    ctx = PruneContext(num_image_tokens=64, image_features=feats, grid=(8, 8))
    keep = pruner.select(ctx)
    assert keep.shape == (1, 16)
    pooled = pruner.gather_features(feats, keep)
    assert pooled[0, 0, 0] == (0 + 1 + 8 + 9) / 4
    assert pruner.select(PruneContext(num_image_tokens=64, image_features=feats, grid=(8, 8))).shape == (1, 16)
    odd = _make("pool", num_keep=13).select(ctx)  # no 13 = r * c with r, c <= 8: first 13 cells of 4x4
    assert odd.shape == (1, 13) and bool((odd[:, 1:] > odd[:, :-1]).all())


def test_budget_validation():
    from mmtok.mllm.pruning import PruningError

    with pytest.raises(PruningError, match="exactly one budget"):
        _make("random", num_keep=3, keep_ratio=0.5)
    assert _make("random", keep_ratio=0.25).budget(576) == 144
    assert _make("fastv").budget(576) == 288  # FastV's default R = 50%


# ---------------------------------------------------------------------------------------------------------
# DART: the reference mode, worked out by hand and against a re-implementation of the reference loop
# ---------------------------------------------------------------------------------------------------------
def _dart_hand_ctx(pad: int = 0) -> PruneContext:
    """BOS, a system token, 8 image tokens (sequence 2..9), 3 question tokens (10..12); ``pad`` left pads.

    Keys (one KV head): BOS has by far the largest L1 norm (as in real LLMs), image token 5 (sequence 7) the
    largest among image tokens, question token 10 the largest after the image. Features (final-norm output):
    the text pivot (10) is e0, the image pivot (image 5) is e1; the other image tokens have these cosines:

        image        0      1      2      3      4      6      7
        cos(., e0) -0.98  -0.20   1.00   0.10  -0.70   0.00   0.51
        cos(., e1)  0.20  -0.98   0.00   0.99  -0.70   0.10  -0.61
    """
    rows = {
        0: [-1.0, 0.0, 0.0, 0.0],  # BOS: -e0, so a BOS pivot would pick image 2 (cos -1) first
        1: [0.0, 0.0, 1.0, 1.0],
        2: [-1.0, 0.2, 0.0, 0.0],
        3: [-0.2, -1.0, 0.0, 0.0],
        4: [1.0, 0.0, 0.0, 0.0],
        5: [0.1, 1.0, 0.0, 0.0],
        6: [-0.7, -0.7, 0.1, 0.0],
        7: [0.0, 1.0, 0.0, 0.0],  # image 5: the image pivot
        8: [0.0, 0.1, 1.0, 0.0],
        9: [0.5, -0.6, 0.0, 0.6],
        10: [1.0, 0.0, 0.0, 0.0],  # the text pivot
        11: [0.0, 0.0, 1.0, 0.0],
        12: [0.0, 0.0, 0.0, 1.0],
    }
    length = 13 + pad
    hidden = torch.full((1, length, 4), 7.0)  # pads: garbage that must not matter
    keys = torch.full((1, 1, length, 4), 9.0)
    for i, v in rows.items():
        hidden[0, pad + i] = torch.tensor(v)
        keys[0, 0, pad + i] = 0.1
    keys[0, 0, pad + 0] = 10.0  # BOS
    keys[0, 0, pad + 7] = 5.0  # image 5
    keys[0, 0, pad + 10] = 3.0  # first question token
    valid = torch.ones(1, length, dtype=torch.bool)
    valid[0, :pad] = False
    ctx = PruneContext(
        num_image_tokens=8,
        llm=_HiddenOnlyLLM(),
        layer=2,
        hidden=hidden,
        image_positions=torch.arange(pad + 2, pad + 10)[None],
        key_valid=valid,
        position_ids=(torch.cumsum(valid.long(), 1) - 1).clamp_min(0),
    )
    ctx.lazy["prev_keys"] = lambda: keys
    return ctx


def test_dart_reference_known_answer():
    # Reference, num_keep=4, one pivot of each kind: each pivot keeps floor(4 / 2) = 2, so 1 + 2 * 2 = 5 kept.
    # Pivots: image 5 (sequence 7) and question token 10; never BOS, which precedes the image. The reference
    # visits list({7, 10}) = [10, 7]: the text pivot e0 first takes the two least similar, images 0 (-0.98) and
    # 4 (-0.70); then the image pivot e1 takes images 1 (-0.98) and 7 (-0.61) of the rest. Kept: 0, 1, 4, 5, 7.
    assert list({7, 10}) == [10, 7]  # CPython's set order, which the reference's loop follows
    for pad in (0, 3):  # left padding changes nothing: positions are those of the unpadded prompt
        ref = _make("dart", num_keep=4, pivot_image=1, pivot_text=1, reference=True)
        assert ref.budget(8) == 5
        assert ref.select(_dart_hand_ctx(pad)).tolist() == [[0, 1, 4, 5, 7]]
    # Default (budget-exact), same inputs: 4 kept, image pivot 5 counts; the other 3 go 2 to the image pivot
    # (visited first): images 1 (-0.98), 4 (-0.70); then 1 to the text pivot: image 0 (-0.98). Kept: 0, 1, 4, 5.
    # With BOS as the text pivot (all text tokens as candidates) it would have been image 2 instead of 0.
    default = _make("dart", num_keep=4, pivot_image=1, pivot_text=1)
    assert default.select(_dart_hand_ctx()).tolist() == [[0, 1, 4, 5]]


def _reference_dart_loop(keys, states, start, n, pivot_image, pivot_text, budget):
    """The reference selection for one unpadded sequence, written from the paper and the reference description.

    ``keys [H, L, d]`` (query heads), ``states [L, D]`` (final-norm hidden states), image tokens at
    ``start .. start + n``. Returns the kept image indices (0-based within the image), sorted.
    """
    flat = keys.transpose(0, 1).reshape(keys.shape[1], -1)  # heads side by side per token
    norm_img = [float(v) for v in flat[start : start + n].abs().sum(-1)]
    norm_txt = [float(v) for v in flat[start + n :].abs().sum(-1)]
    img_piv = [start + i for i in sorted(range(n), key=lambda i: -norm_img[i])[:pivot_image]]
    txt_piv = [start + n + i for i in sorted(range(len(norm_txt)), key=lambda i: -norm_txt[i])[:pivot_text]]
    per = int(budget // (pivot_image + pivot_text))
    kept = set(img_piv + txt_piv)
    left = set(range(start, start + n)) - set(img_piv)
    for piv in list(kept):  # visiting order = iteration order of the pivots' set
        cand = list(left)
        cos = [float(F.cosine_similarity(states[piv], states[c], dim=0)) for c in cand]
        chosen = [cand[i] for i in sorted(range(len(cand)), key=lambda i: cos[i])[:per]]
        kept |= set(chosen)
        left -= set(chosen)
    return sorted(i - start for i in kept - set(txt_piv))


@pytest.mark.parametrize("budget", [64, 100, 37])
def test_dart_reference_equals_reference_loop(budget):
    """LLaVA-like prompt: 35 text tokens before 144 image tokens, 20 after; random keys and states."""
    g = torch.Generator().manual_seed(budget)
    before, n, after, heads = 35, 144, 20, 2
    length = before + n + after
    keys = torch.randn(1, heads, length, 8, generator=g)
    keys[0, :, 0] *= 50  # a BOS-like key: must never become a pivot
    hidden = torch.randn(1, length, 16, generator=g)
    ctx = PruneContext(
        num_image_tokens=n,
        llm=_HiddenOnlyLLM(),
        layer=2,
        hidden=hidden,
        image_positions=torch.arange(before, before + n)[None],
        key_valid=torch.ones(1, length, dtype=torch.bool),
        position_ids=torch.arange(length)[None],
    )
    ctx.lazy["prev_keys"] = lambda: keys
    pruner = _make("dart", num_keep=budget, reference=True)
    got = pruner.select(ctx)
    want = _reference_dart_loop(keys[0], hidden[0], before, n, 4, 4, budget)
    assert got[0].tolist() == want
    assert len(want) == 4 + 8 * (budget // 8) == pruner.budget(n)
    # the ratio budget is the reference's N * (1 - reduction_ratio), floored per pivot
    by_ratio = _make("dart", keep_ratio=0.222, reference=True)
    assert by_ratio.budget(n) == 4 + 8 * int(n * 0.222 // 8)
    # the default mode keeps exactly the budget and shares most of the reference's choices
    default = _make("dart", num_keep=budget).select(ctx)[0].tolist()
    assert len(default) == budget and len(set(default) & set(want)) >= budget // 2


def test_dart_reference_in_the_mllm_batch_equals_single_runs_and_reference_loop(model):
    """Through the MLLM (left-padded batch, GQA keys): every sample's keep set is the reference loop's."""
    ids, att, images = _batch()
    pruner = _make("dart", num_keep=16, reference=True)
    seen = {}

    def select(ctx):
        seen["keys"], seen["hidden"], seen["valid"] = ctx.get("prev_keys"), ctx.hidden, ctx.key_valid.bool()
        seen["pos"] = ctx.image_positions
        seen["keep"] = type(pruner).select(pruner, ctx)
        return seen["keep"]

    pruner.select = select
    with torch.no_grad():
        model(ids, images, att, pruner=pruner)
        keep, keys, hidden, valid = seen["keep"], seen["keys"], seen["hidden"], seen["valid"]
        assert keep.shape == (3, 4 + 8 * 2)
        groups = model.llm.config.num_attention_heads // keys.shape[1]
        for b in range(3):
            v = valid[b]
            start = int(seen["pos"][b, 0]) - int((~v).sum())
            states = model.llm.model.norm(hidden[b][v])
            k_b = keys[b][:, v].repeat_interleave(groups, dim=0)
            assert keep[b].tolist() == _reference_dart_loop(k_b, states, start, N, 4, 4, 16)
        for b in range(3):  # a single run of each prompt keeps the same tokens
            model(ids[b : b + 1, att[b].bool()], images[b : b + 1], pruner=pruner)
            assert torch.equal(seen["keep"][0], keep[b])


def test_dart_reference_needs_text_after_the_image():
    from mmtok.mllm.pruning import PruningError

    ctx = _dart_hand_ctx()
    with pytest.raises(PruningError, match="after the image"):
        _make("dart", num_keep=4, pivot_text=4, reference=True).select(ctx)  # 3 question tokens only
    assert _make("dart", num_keep=4, pivot_text=4).select(ctx).shape == (1, 4)  # the default copes


def test_dart_pivots_and_layer_are_validated():
    from mmtok.mllm.pruning import PruningError

    with pytest.raises(PruningError, match="pivot_image \\+ pivot_text must be >= 1"):
        _make("dart", num_keep=8, pivot_image=0, pivot_text=0)
    with pytest.raises(PruningError, match="pivot_text must be an integer >= 0"):
        _make("dart", num_keep=8, pivot_text=-1)
    with pytest.raises(PruningError, match="layer must be an integer >= 1"):
        _make("dart", num_keep=8, layer=0)
    with pytest.raises(PruningError, match="layer must be an integer >= 1"):
        _make("fastv", layer=0)
    # image pivots alone work; text pivots alone work when there is text after the image ...
    assert _make("dart", num_keep=4, pivot_image=1, pivot_text=0).select(_dart_hand_ctx()).shape == (1, 4)
    assert _make("dart", num_keep=4, pivot_image=0, pivot_text=2).select(_dart_hand_ctx()).shape == (1, 4)
    # ... and say so when there is none
    ctx = _dart_hand_ctx()
    ctx.key_valid[0, 10:] = False
    with pytest.raises(PruningError, match="no pivot"):
        _make("dart", num_keep=4, pivot_image=0, pivot_text=2).select(ctx)


@pytest.mark.parametrize("name", [p for p in PRUNERS if p != "none"])
@pytest.mark.parametrize(
    "budget",
    [{"num_keep": 0}, {"keep_ratio": 0.0}, {"num_keep": -3}, {"keep_ratio": 1.5}, {"num_keep": 8.0}, {}],
    ids=["num_keep=0", "keep_ratio=0", "negative", "ratio>1", "float", "none"],
)
def test_zero_or_missing_budget_is_rejected_with_one_message(name, budget):
    from mmtok.mllm.pruning import BUDGET_HELP, PruningError

    if name == "fastv" and not budget:
        assert _make(name).budget(576) == 288  # FastV's own default, R = 50%
        return
    with pytest.raises(PruningError) as e:
        _make(name, **budget)
    assert BUDGET_HELP in str(e.value)


def test_none_needs_no_budget_but_rejects_a_bad_one():
    from mmtok.mllm.pruning import PruningError

    assert _make("none").budget(10) == 10
    assert _make("none", num_keep=3).budget(10) == 10  # callers pass one budget to every pruner
    with pytest.raises(PruningError):
        _make("none", num_keep=0)

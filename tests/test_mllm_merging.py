"""Token merging (ToMe, PiToMe): known answers, the reference's choices against loop re-derivations, the MLLM hook,
proportional attention in the LLM and merging inside the vision tower."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import fashion_vqa_shards

from mmtok import registries
from mmtok.mllm import decoder as dec
from mmtok.mllm.modeling import MLLMConfig
from mmtok.mllm.pruning import MergeResult, PruneContext, merge_slots
from mmtok.mllm.pruning import merge as mg

IMG = 120
N = 64  # tiny CLIP: 32 px, patch 4 -> 8 x 8 image tokens


def _make(name: str, **kw):
    return registries.get("pruner").create(name, **kw)


def _partition(source_map: torch.Tensor) -> set[frozenset[int]]:
    """The groups of original tokens a source map ``[N]`` defines (independent of the merged tokens' order)."""
    groups: dict[int, set[int]] = {}
    for i, g in enumerate(source_map.tolist()):
        groups.setdefault(g, set()).add(i)
    return {frozenset(v) for v in groups.values()}


def _duplicates(seed: int = 0, n: int = 16, d: int = 64):
    """``n`` random (nearly orthogonal) tokens where tokens (0,1), (4,5), (6,7), (10,11) are exact duplicates."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, d, generator=g)
    pairs = [(0, 1), (4, 5), (6, 7), (10, 11)]
    for a, b in pairs:
        x[0, b] = x[0, a]
    return x, pairs


# ---------------------------------------------------------------------------------------------------------
# known answers
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tome", "pitome"])
@pytest.mark.parametrize("reference", [False, True])
def test_exact_duplicates_merge_first_and_distinct_tokens_stay(name, reference):
    x, pairs = _duplicates()
    n = x.shape[1]
    merger = _make(name, num_keep=n - len(pairs), reference=reference)
    res = merger.merge(PruneContext(num_image_tokens=n, image_features=x))
    assert _partition(res.source_map[0]) == {frozenset(p) for p in pairs} | {
        frozenset([i]) for i in range(n) if not any(i in p for p in pairs)
    }
    for k in range(res.sizes.shape[1]):
        members = (res.source_map[0] == k).nonzero()[:, 0]
        assert res.sizes[0, k] == len(members)
        # a duplicate pair becomes the token itself, a distinct token is untouched (bit for bit up to the
        # division by its size 1)
        torch.testing.assert_close(res.features[0, k], x[0, members[0]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["tome", "pitome"])
@pytest.mark.parametrize("k", [1, 2, 5, 17, 63, 64])
def test_merge_to_exactly_k_and_source_map_covers_every_patch(name, k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(3, N, 16, generator=g)
    res = _make(name, num_keep=k).merge(PruneContext(num_image_tokens=N, image_features=x))
    assert res.features.shape == (3, k, 16) and res.sizes.shape == (3, k) and res.source_map.shape == (3, N)
    for b in range(3):
        counts = torch.bincount(res.source_map[b], minlength=k)
        assert counts.shape == (k,) and bool((counts >= 1).all())  # every merged token covers >= 1 patch
        assert torch.equal(counts.float(), res.sizes[b])
    # size-weighted averages of averages: every merged token is the plain mean of the patches it covers
    means = torch.zeros(3, k, 16).scatter_add_(1, res.source_map[..., None].expand(-1, -1, 16), x)
    torch.testing.assert_close(res.features, means / res.sizes[..., None], rtol=1e-5, atol=1e-5)
    # ordered by mean position; unmerge gives every patch its group's feature
    pos = res.mean_positions()
    assert bool((pos[:, 1:] >= pos[:, :-1]).all())
    torch.testing.assert_close(
        res.unmerge(res.features),
        (means / res.sizes[..., None]).gather(1, res.source_map[..., None].expand(-1, -1, 16)),
    )


def test_slots_are_the_rounded_mean_position_moved_on_collision():
    # 6 tokens -> 3 groups {0,1} (mean 0.5 -> 1), {2} (2), {3,4,5} (4)
    res = MergeResult(torch.zeros(1, 3, 2), torch.tensor([[2.0, 1.0, 3.0]]), torch.tensor([[0, 0, 1, 2, 2, 2]]))
    assert merge_slots(res).tolist() == [[1, 2, 4]]
    # {0, 2} (mean 1), {1} (1): the second moves to the next free slot
    res = MergeResult(torch.zeros(1, 2, 2), torch.tensor([[2.0, 1.0]]), torch.tensor([[0, 1, 0]]))
    assert merge_slots(res).tolist() == [[1, 2]]
    # collisions at the end move back so that every token fits: {0..3} -> 2 (mean 1.5 rounds up), {4}, {5} ...
    res = MergeResult(torch.zeros(1, 3, 2), torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[0, 1, 2]]))
    assert merge_slots(res).tolist() == [[0, 1, 2]]
    res = MergeResult(torch.zeros(1, 3, 2), torch.tensor([[2.0, 1.0, 1.0]]), torch.tensor([[0, 1, 0, 2]]))
    assert merge_slots(res).tolist() == [[1, 2, 3]]


# ---------------------------------------------------------------------------------------------------------
# the reference's choices against loop re-derivations (written from the papers' descriptions)
# ---------------------------------------------------------------------------------------------------------
def _cos(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def _tome_loop(rows: list[list[float]], r: int, protected: int) -> list[int]:
    """ToMe's step on one sample: A = even tokens, B = odd; each A token's best B partner; the r A tokens with the
    strongest links merge; output = unmerged A (strongest first; by index with a class token), then B."""
    a_set, b_set = list(range(0, len(rows), 2)), list(range(1, len(rows), 2))
    best = {}
    for a in a_set:
        sims = [_cos(rows[a], rows[b]) for b in b_set]
        j = max(range(len(b_set)), key=lambda i: sims[i])
        best[a] = (-math.inf if (protected and a == 0) else sims[j], j)
    ranked = sorted(a_set, key=lambda a: -best[a][0])
    src, unm = ranked[:r], ranked[r:]
    if protected:
        unm = sorted(unm)
    out = {a: i for i, a in enumerate(unm)}
    out.update({b: len(unm) + j for j, b in enumerate(b_set)})
    out.update({a: len(unm) + best[a][1] for a in src})
    return [out[i] for i in range(len(rows))]


def _pitome_loop(rows: list[list[float]], r: int, margin: float) -> list[int]:
    """PiToMe's step on one sample: energy = mean ELU(cos - margin); the 2r most energetic tokens alternate into A
    and B (energy order); every A token goes to its most similar B; output = protected (by energy), then B."""
    t = len(rows)

    def elu(v: float) -> float:
        return v if v > 0 else math.exp(v) - 1

    energy = [sum(elu(_cos(rows[i], rows[j]) - margin) for j in range(t)) / t for i in range(t)]
    order = sorted(range(t), key=lambda i: -energy[i])
    a_set, b_set, kept = order[: 2 * r : 2], order[1 : 2 * r : 2], order[2 * r :]
    out = {p: i for i, p in enumerate(kept)}
    out.update({b: len(kept) + j for j, b in enumerate(b_set)})
    for a in a_set:
        j = max(range(r), key=lambda i: _cos(rows[a], rows[b_set[i]]))
        out[a] = len(kept) + j
    return [out[i] for i in range(t)]


@pytest.mark.parametrize("t,r,protected", [(16, 5, 0), (17, 8, 0), (17, 3, 1), (12, 6, 0)])
def test_tome_step_equals_loop_rederivation(t, r, protected):
    x = torch.randn(2, t, 8, generator=torch.Generator().manual_seed(t + r))
    assign, t_out = mg.tome_step(x, r, protected, stable=False)
    assert t_out == t - r
    for b in range(2):
        assert assign[b].tolist() == _tome_loop(x[b].tolist(), r, protected)
    assert torch.equal(mg.tome_step(x, r, protected, stable=True)[0], assign)  # no ties here: modes agree


@pytest.mark.parametrize("t,r,margin", [(16, 5, 0.5), (17, 8, 0.0), (12, 3, 0.9)])
def test_pitome_step_equals_loop_rederivation(t, r, margin):
    x = torch.randn(2, t, 8, generator=torch.Generator().manual_seed(t + r))
    x[:, 3] = x[:, 2] + 0.1  # some near-duplicates, so energies differ clearly
    assign, t_out = mg.pitome_step(x, r, 0, margin, stable=False)
    assert t_out == t - r
    for b in range(2):
        assert assign[b].tolist() == _pitome_loop(x[b].tolist(), r, margin)


@pytest.mark.parametrize("name", ["tome", "pitome"])
def test_reference_mode_multi_step_equals_loop_rederivation(name):
    n, k = 24, 5
    x = torch.randn(1, n, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    res = _make(name, num_keep=k, reference=True).merge(PruneContext(num_image_tokens=n, image_features=x))
    # the loop: repeated steps on the size-weighted means, the reference's output order between steps
    rows, groups = x[0].tolist(), [[i] for i in range(n)]
    while len(rows) > k:
        r = min(len(rows) - k, len(rows) // 2)
        out = _tome_loop(rows, r, 0) if name == "tome" else _pitome_loop(rows, r, 0.5)
        new_groups: list[list[int]] = [[] for _ in range(len(rows) - r)]
        for i, o in enumerate(out):
            new_groups[o] += groups[i]
        groups = new_groups
        rows = [x[0, g].mean(0).tolist() for g in groups]
    assert _partition(res.source_map[0]) == {frozenset(g) for g in groups}


# ---------------------------------------------------------------------------------------------------------
# in the MLLM (the pre-LLM hook)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    llm = {**MLLMConfig().llm, "pad_token_id": 0, "eos_token_id": 2}  # the default tiny Llama (2 x 64)
    return registries.get("mllm").create("llava", llm=llm, image_token_id=IMG).eval()


def _prompt(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat(
        [torch.randint(3, 100, (3,), generator=g), torch.tensor([IMG]), torch.randint(3, 100, (5,), generator=g)]
    )
    return ids[None], torch.rand(1, 3, 32, 32, generator=g)


@pytest.mark.parametrize("name", ["tome", "pitome"])
def test_mllm_places_merged_tokens_at_rounded_mean_positions(model, name):
    ids, images = _prompt()
    merger = _make(name, num_keep=10)
    with torch.no_grad():
        prep = model.prepare(ids, None, images)
        out, keep = model._run(prep, merger, use_cache=False)
    res = merger.last_result
    start = int(prep.image_positions[0, 0])
    slots = torch.floor(res.mean_positions() + 0.5).long()
    # positions are the slots (rounded mean positions, moved only on a collision)
    img_pos = out.position_ids[0][prep.image_mask[0].gather(0, out.keep_index[0])]
    assert torch.equal(img_pos - prep.position_ids[0, start], keep[0])
    moved = (keep != slots).sum().item()
    assert moved <= 3, moved
    # the LLM sees the merged features in those slots
    torch.testing.assert_close(prep.embeds[0, prep.image_positions[0, keep[0]]], res.features[0].to(prep.embeds))


# ---------------------------------------------------------------------------------------------------------
# proportional attention
# ---------------------------------------------------------------------------------------------------------
def test_proportional_attention_hand_built_case():
    # one query, keys k0, k1, k1 (a duplicate): merging the duplicates into one key of size 2 with bias log 2 gives
    # the merged key exactly the attention the two sources had together, and leaves the others unchanged
    q = torch.tensor([[[[1.0, 2.0]]]])  # [B, H, 1, d]
    k_full = torch.tensor([[[[0.5, -1.0], [1.0, 1.0], [1.0, 1.0]]]])
    v_full = torch.tensor([[[[1.0, 0.0], [0.0, 3.0], [0.0, 3.0]]]])
    scale = 1 / math.sqrt(2)
    w_full = torch.softmax((q @ k_full.transpose(-1, -2)) * scale, dim=-1)[0, 0, 0]
    k_m, v_m = k_full[:, :, :2], v_full[:, :, :2]
    bias = torch.tensor([0.0, math.log(2.0)])
    w_m = torch.softmax((q @ k_m.transpose(-1, -2)) * scale + bias, dim=-1)[0, 0, 0]
    torch.testing.assert_close(w_m[1], w_full[1] + w_full[2])
    torch.testing.assert_close(w_m[0], w_full[0])
    # SDPA with the bias as its additive mask gives the same output as attention over the unmerged keys
    out_m = F.scaled_dot_product_attention(q, k_m, v_m, attn_mask=bias.view(1, 1, 1, 2))
    out_f = F.scaled_dot_product_attention(q, k_full, v_full)
    torch.testing.assert_close(out_m, out_f)


def _one_layer_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def test_key_bias_in_the_decoder_equals_duplicated_keys():
    # a real (one-layer) LLM: token 3 appears twice at the same position (identical keys and values) against one
    # copy with key bias log 2: every later token computes the same output. (Beyond one layer the two copies differ:
    # the first cannot see the second, so exact equality is a one-layer property.)
    llm = _one_layer_llama()
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(1, 8, 64, generator=g)
    dup = torch.cat([emb[:, :4], emb[:, 3:4], emb[:, 4:]], dim=1)  # [1, 9, 64]
    pos_dup = torch.tensor([[0, 1, 2, 3, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        full = dec.run_layers(llm, dup, torch.ones(1, 9, dtype=torch.bool), pos_dup)
        bias = torch.zeros(1, 8)
        bias[0, 3] = math.log(2.0)
        merged = dec.run_layers(llm, emb, torch.ones(1, 8, dtype=torch.bool), torch.arange(8)[None], key_bias=bias)
        plain = dec.run_layers(llm, emb, torch.ones(1, 8, dtype=torch.bool), torch.arange(8)[None])
    torch.testing.assert_close(merged.hidden[:, 4:], full.hidden[:, 5:], rtol=1e-5, atol=1e-5)
    # the merged token itself equals the second copy (which sees both copies)
    torch.testing.assert_close(merged.hidden[:, 3], full.hidden[:, 4], rtol=1e-5, atol=1e-5)
    assert (plain.hidden[:, 4:] - full.hidden[:, 5:]).abs().max() > 1e-3  # without the bias they differ


def test_key_bias_follows_the_kv_cache(model):
    llm = model.llm
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(1, 8, 64, generator=g)
    nxt = torch.randn(1, 1, 64, generator=g)
    bias = torch.zeros(1, 8)
    bias[0, 2] = math.log(3.0)
    valid = torch.ones(1, 8, dtype=torch.bool)
    with torch.no_grad():
        pre = dec.run_layers(llm, emb, valid, torch.arange(8)[None], use_cache=True, key_bias=bias)
        step = dec.decode_step(llm, nxt, pre.state)
        whole = dec.run_layers(
            llm,
            torch.cat([emb, nxt], 1),
            torch.ones(1, 9, dtype=torch.bool),
            torch.arange(9)[None],
            key_bias=torch.cat([bias, torch.zeros(1, 1)], 1),
        )
    torch.testing.assert_close(step[:, 0], whole.hidden[:, -1], rtol=1e-5, atol=1e-5)


def test_merge_key_bias_marks_merged_slots(model):
    ids, images = _prompt()
    merger = _make("tome", num_keep=6)
    with torch.no_grad():
        prep = model.prepare(ids, None, images)
        keep = merger.select(prep.ctx)
    bias = mg.merge_key_bias(merger.last_result, keep, prep.image_positions, prep.embeds.shape[1])
    assert bias.shape == prep.embeds.shape[:2]
    torch.testing.assert_close(bias[0, prep.image_positions[0, keep[0]]], merger.last_result.sizes[0].log())
    assert int((bias != 0).sum()) == int((merger.last_result.sizes > 1).sum())


@pytest.mark.parametrize("name", ["tome", "pitome"])
def test_prefill_logits_is_the_mllm_path_plus_the_size_bias(model, name):
    from mmtok.mllm.pruning import PruningError

    ids, images = _prompt(3)
    with torch.no_grad():
        own = model(ids, images, pruner=_make(name, num_keep=9), logits_to_keep=1).logits[:, -1]
        same = mg.prefill_logits(model, ids, images, _make(name, num_keep=9))
        prop = mg.prefill_logits(model, ids, images, _make(name, num_keep=9, proportional_attention=True))
        # the MLLM's own path applies the bias (forward, and generation with and without the KV cache)
        own_prop = model(ids, images, pruner=_make(name, num_keep=9, proportional_attention=True), logits_to_keep=1)
        gens = [
            model.generate(
                ids, images, pruner=_make(name, num_keep=9, proportional_attention=True), max_new_tokens=4, **kw
            ).sequences
            for kw in ({}, {"use_cache": False})
        ]
        with pytest.raises(PruningError, match="proportional_attention=True needs the caller"):
            ctx = model.prepare(ids, None, images).ctx  # a caller that does not apply the bias
            _make(name, num_keep=9, proportional_attention=True).select(ctx)
    torch.testing.assert_close(same, own, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(own_prop.logits[:, -1], prop, rtol=1e-5, atol=1e-5)
    assert (prop - own).abs().max() > 1e-4
    assert torch.equal(gens[0], gens[1])


# ---------------------------------------------------------------------------------------------------------
# inside the vision tower
# ---------------------------------------------------------------------------------------------------------
def _timm_tower():
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}
    return registries.get("vision tower").create("timm_vit", model_name="vit_tiny_patch16_224", kwargs=kwargs).eval()


def _mmtok_vit():
    from mmtok.mim.vit import ViTConfig, ViTEncoder

    torch.manual_seed(0)
    cfg = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    return ViTEncoder(cfg).eval()


@pytest.mark.parametrize("which", ["timm", "mmtok"])
@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_tower_merging_with_r0_equals_the_towers_own_forward(which, method):
    from mmtok.mllm.pruning.tower_merge import TowerMergeConfig, tower_hidden_states

    tower = _timm_tower() if which == "timm" else _mmtok_vit()
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tower.hidden_states(px) if which == "timm" else tower.forward_features(px, output_hidden_states=True)
        out = tower_hidden_states(tower, px, TowerMergeConfig(method=method, r=0))
    assert len(out.hidden_states) == len(ref)
    for a, b in zip(out.hidden_states, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_tower_merging_exact_duplicates_changes_nothing_with_proportional_attention(method):
    # In a ViT, two identical tokens stay identical in every block (attention is not causal). Merging them after
    # block 0's attention, with proportional attention in the later blocks, must give every token the output it
    # had without merging; without proportional attention the outputs move. Every patch has a twin here: PiToMe
    # ranks tokens by density (energy), not by duplication, so with distinct tokens in dense regions of the keys it
    # may merge those first (the pre-LLM duplicates test above has spread-out distinct tokens).
    from mmtok.mllm.pruning.tower_merge import TowerMergeConfig, merged_blocks

    tower = _timm_tower()
    blocks = tower.model.blocks
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 17, 32, generator=g) * 2  # [CLS] + 16 patches
    pairs = [(i, i + 1) for i in range(1, 17, 2)]  # one token of each pair in ToMe's A set, one in B
    for a, b in pairs:
        x[0, b] = x[0, a]
    cfg = TowerMergeConfig(method=method, r=[len(pairs)], prop_attn=True, margin_start=0.9)
    with torch.no_grad():
        plain = merged_blocks(blocks, x, TowerMergeConfig(method=method, r=0), 1)
        out = merged_blocks(blocks, x, cfg, 1)
        no_prop = merged_blocks(blocks, x, TowerMergeConfig(method=method, r=[len(pairs)], prop_attn=False), 1)
    assert out.hidden_states[-1].shape[1] == 17 - len(pairs)
    assert _partition(out.source_map[0]) == {frozenset(p) for p in pairs} | {
        frozenset([i]) for i in range(17) if not any(i in p for p in pairs)
    }
    assert out.sizes[0].sum() == 17
    for i in range(1, 4):
        torch.testing.assert_close(out.unmerged(i), plain.hidden_states[i], rtol=1e-4, atol=1e-4)
    assert (no_prop.unmerged(3) - plain.hidden_states[3]).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_tower_merging_r_per_block_and_reference_mode(method):
    from mmtok.mllm.pruning.tower_merge import TowerMergeConfig, tower_hidden_states

    tower = _timm_tower()
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for reference in (False, True):
        with torch.no_grad():
            out = tower_hidden_states(tower, px, TowerMergeConfig(method=method, r=3, reference=reference))
        assert [h.shape[1] for h in out.hidden_states] == [17, 14, 11, 8]
        with torch.no_grad():  # PiToMe's ratio convention: floor(T - 0.75 T) of the T = 16, 12, 9 patches
            ratio = tower_hidden_states(tower, px, TowerMergeConfig(method=method, keep_ratio=0.75))
        assert [h.shape[1] for h in ratio.hidden_states] == [17, 13, 10, 8]
        assert out.source_map.shape == (2, 17) and bool((out.source_map[:, 0] == 0).all())  # [CLS] stays first
        for b in range(2):
            assert torch.equal(torch.bincount(out.source_map[b], minlength=8).float(), out.sizes[b])


def test_merging_tower_inside_the_mllm(model):
    from mmtok.mllm.pruning.tower_merge import TowerMergeConfig, merging_tower

    torch.manual_seed(0)
    spec = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    mllm = (
        registries.get("mllm")
        .create(
            "llava",
            tower={"name": "timm_vit", "model_name": "vit_tiny_patch16_224", "kwargs": spec},
            llm=dict(model.config.llm),
            image_token_id=IMG,
            feature_layer=-1,
        )
        .eval()
    )
    ids, images = _prompt()
    with torch.no_grad():
        ref = mllm(ids, images).logits
        with merging_tower(mllm.tower, TowerMergeConfig(r=0)):
            same = mllm(ids, images).logits
        with merging_tower(mllm.tower, TowerMergeConfig(r=16)) as info:
            merged = mllm(ids, images, pruner=_make("tome", num_keep=32))
        assert "hidden_states" not in vars(mllm.tower)  # restored
    torch.testing.assert_close(same, ref, rtol=1e-5, atol=1e-5)
    assert info["last"].hidden_states[-1].shape[1] == 1 + 64 - 32  # the tower ran on 33 tokens at the end
    assert merged.image_mask.sum() == 32


# ---------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------
def test_list_pruners_shows_both_kinds(capsys):
    from mmtok.cli.main import main

    assert main(["list", "pruners"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()[1:]}
    assert "[merge]" in lines["tome"] and "[merge]" in lines["pitome"]
    assert "[select]" in lines["dart"] and "[select]" in lines["random"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_models import tiny_fashion_mllm

    torch.manual_seed(0)
    m = registries.get("mllm").create("llava_fashion_small", **tiny_fashion_mllm("llama"))
    out = tmp_path_factory.mktemp("mllm") / "model"
    m.save_pretrained(out)
    return out


def test_prune_cli_merges_before_the_llm_and_in_the_tower(model_dir, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from mmtok.cli.main import main

    img = tmp_path / "scene.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(img)
    args = ["prune", "--model", str(model_dir), "--image", str(img), "--prompt", "how many items are there ?"]
    args += ["--keep", "5", "--max-new-tokens", "3", "--repeats", "1"]
    assert main([*args, "--method", "tome"]) == 0
    out = capsys.readouterr().out
    assert "image tokens kept: 5 of 16" in out and "merged groups: 5; the largest covers" in out
    assert main([*args, "--method", "pitome", "--tower-r", "3"]) == 0
    out = capsys.readouterr().out
    assert "vision tower: 17 -> 11 tokens (3 merged per block, pitome)" in out and "x by FLOPs (" in out
    assert main([*args, "--method", "tome", "--tower-r", "-1"]) == 2
    assert "--tower-r" in capsys.readouterr().err


def test_eval_cli_has_merging_rows(model_dir, tmp_path, capsys):
    import json

    from mmtok.cli.main import main

    fashion_vqa_shards(tmp_path / "d", test=6)
    rc = main(
        [
            "eval",
            "mllm",
            "--model",
            str(model_dir),
            "--data",
            str(tmp_path / "d" / "test-*.tar"),
            "--methods",
            "tome",
            "pitome",
            "--keeps",
            "4",
            "--tower-r",
            "2",
            "--json",
            str(tmp_path / "acc.json"),
        ]
    )
    assert rc == 0
    rows = json.loads((tmp_path / "acc.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "tome", "pitome", "tower_tome_r2", "tower_pitome_r2"]
    assert rows[1]["kind"] == "merge" and rows[3]["tower_tokens"] == [17, 15, 13]

"""mmtok's decoder loop (mmtok/mllm/decoder.py) against each accepted family's own transformers causal LM.

Every family in ``decoder.FAMILIES`` has a tiny case here whose sliding windows (where the family has them)
are shorter than the sequences, so that a wrong per-layer window changes the numbers.
"""

from __future__ import annotations

import pytest
import torch

from mmtok.mllm import decoder as dec

# family -> (model_type, config overrides, attention kernel); windows of 6 bite on 20-token prompts
FAMILY_CASES: dict[str, tuple[str, dict, str]] = {
    "llama": ("llama", {}, "sdpa"),
    "mistral": ("mistral", {"sliding_window": 6}, "sdpa"),
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}, "sdpa"),
    "qwen3": (
        "qwen3",
        {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 2, "head_dim": 16},
        "sdpa",
    ),
    "gemma": ("gemma", {"head_dim": 16}, "sdpa"),
    "gemma2": (
        "gemma2",
        {
            "sliding_window": 6,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "final_logit_softcapping": 5.0,
            "attn_logit_softcapping": 5.0,
        },
        "eager",
    ),
    "granite": (
        "granite",
        {"embedding_multiplier": 6.0, "residual_multiplier": 0.3, "logits_scaling": 4.0, "attention_multiplier": 0.1},
        "sdpa",
    ),
}


def tiny_text_config(model_type: str, **overrides):
    """A tiny transformers text config (hidden 64, 3 layers, 4 heads / 2 KV heads, vocab 128)."""
    from transformers.models.auto import CONFIG_MAPPING

    spec = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
        "max_position_embeddings": 512,
        "pad_token_id": 0,
        "eos_token_id": 2,
        **overrides,
    }
    return CONFIG_MAPPING[model_type](**spec)


def tiny_causal_lm(family: str, attn: str | None = None):
    """A seeded tiny causal LM of ``family`` with weights scaled up so its logits are far from uniform."""
    from transformers import AutoModelForCausalLM

    model_type, overrides, default_attn = FAMILY_CASES[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_text_config(model_type, **overrides), attn_implementation=attn or default_attn
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0 if p.ndim > 1 else 1.0)
    return model


def _batch(lengths=(20, 14)):
    """Left-padded ids, attention mask and position ids (real tokens at positions 0..n-1)."""
    torch.manual_seed(1)
    length = max(lengths)
    ids = torch.zeros(len(lengths), length, dtype=torch.long)
    att = torch.zeros(len(lengths), length, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, length - n :] = torch.randint(3, 120, (n,))
        att[i, length - n :] = 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    return ids, att, pos


def _ours(llm, ids, att, pos, **kwargs):
    return dec.run_layers(llm, llm.get_input_embeddings()(ids), att.bool(), pos, **kwargs)


@pytest.fixture(scope="module", params=sorted(FAMILY_CASES))
def family_llm(request):
    return request.param, tiny_causal_lm(request.param)


def test_every_accepted_family_has_a_case():
    assert set(FAMILY_CASES) == set(dec.FAMILIES)


def test_layer_windows_follow_transformers_rules():
    assert dec.layer_windows(tiny_causal_lm("llama")) == [None] * 3
    assert dec.layer_windows(tiny_causal_lm("mistral")) == [6] * 3
    assert dec.layer_windows(tiny_causal_lm("qwen2")) == [None, 6, 6]  # layers >= max_window_layers slide
    assert dec.layer_windows(tiny_causal_lm("qwen3")) == [None, None, 6]
    assert dec.layer_windows(tiny_causal_lm("gemma2")) == [6, None, 6]  # alternating, sliding first
    assert dec.layer_windows(tiny_causal_lm("granite")) == [None] * 3
    # a family without windows ignores a stray sliding_window, as transformers does
    from transformers import AutoModelForCausalLM

    stray = AutoModelForCausalLM.from_config(tiny_text_config("llama", sliding_window=4))
    assert dec.layer_windows(stray) == [None] * 3
    # Qwen2 keeps full attention everywhere unless use_sliding_window is set
    plain = AutoModelForCausalLM.from_config(tiny_text_config("qwen2", sliding_window=4, max_window_layers=1))
    assert dec.layer_windows(plain) == [None] * 3
    # transformers' own per-layer attribute agrees wherever the family has one
    for family in ("qwen2", "qwen3", "gemma2"):
        llm = tiny_causal_lm(family)
        assert dec.layer_windows(llm) == [blk.self_attn.sliding_window for blk in llm.model.layers]


def test_logits_match_causal_lm(family_llm):
    family, llm = family_llm
    ids, att, pos = _batch()
    with torch.no_grad():
        ref = llm(input_ids=ids, attention_mask=att, position_ids=pos).logits
        hidden = _ours(llm, ids, att, pos).hidden
        got = dec.lm_logits(llm, hidden)
        plain = dec.lm_logits(llm, hidden, convention="llava")
    valid = att.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, llm.lm_head(hidden))
    changes_head = family in ("gemma2", "granite")
    assert changes_head == (not torch.allclose(plain, got)), family


def test_greedy_generation_matches_causal_lm(family_llm):
    _, llm = family_llm
    ids, att, pos = _batch()
    steps = 20  # prompt + generation well past every window
    ref = llm.generate(
        input_ids=ids, attention_mask=att, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0
    )[:, ids.shape[1] :]
    embed = llm.get_input_embeddings()
    got = []
    with torch.no_grad():
        out = _ours(llm, ids, att, pos, use_cache=True)
        logits = dec.lm_logits(llm, out.hidden[:, -1])
        for _ in range(steps):
            logits[:, 2] = float("-inf")  # min_new_tokens: no EOS
            tok = logits.argmax(-1)
            got.append(tok)
            logits = dec.lm_logits(llm, dec.decode_step(llm, embed(tok[:, None]), out.state)[:, -1])
    assert torch.equal(torch.stack(got, 1), ref)


def _keep_hook(drop: slice):
    """A prune hook that drops sequence positions ``drop`` (from every sample) at its layer."""

    def hook(i, hidden, valid, pos, saved, cache):
        keep = torch.ones(hidden.shape[1], dtype=torch.bool)
        keep[drop] = False
        return keep.nonzero()[:, 0].expand(hidden.shape[0], -1)

    return hook


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "mistral"])
def test_pruned_cached_decoding_matches_recomputation(family):
    """After pruning at layer 2, cached steps equal a full recomputation with the same keep set (per-window masks)."""
    llm = tiny_causal_lm(family)
    ids, att, pos = _batch()
    embed = llm.get_input_embeddings()
    drop = slice(8, 13)
    with torch.no_grad():
        out = _ours(llm, ids, att, pos, use_cache=True, prune_layer=2, prune_hook=_keep_hook(drop))
        assert out.hidden.shape[1] == ids.shape[1] - 5
        seq_ids, seq_att, seq_pos = ids, att, pos
        for _ in range(8):
            tok = dec.lm_logits(llm, out.hidden[:, -1]).argmax(-1)
            cached = dec.decode_step(llm, embed(tok[:, None]), out.state)
            seq_ids = torch.cat([seq_ids, tok[:, None]], 1)
            seq_pos = torch.cat([seq_pos, seq_pos[:, -1:] + 1], 1)
            seq_att = torch.cat([seq_att, torch.ones_like(tok)[:, None]], 1)
            full = _ours(llm, seq_ids, seq_att, seq_pos, prune_layer=2, prune_hook=_keep_hook(drop))
            torch.testing.assert_close(cached[:, -1], full.hidden[:, -1], atol=1e-5, rtol=1e-5)
            out.hidden = cached


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_bidirectional_tail_agrees_between_prefill_and_chunk(family):
    """``run_layers(bidirectional_tail=T)`` and ``decode_chunk(bidirectional=True)`` after the prefix agree."""
    llm = tiny_causal_lm(family)
    ids, att, pos = _batch()
    t = 4
    with torch.no_grad():
        whole = _ours(llm, ids, att, pos, bidirectional_tail=t).hidden[:, -t:]
        prefix = _ours(llm, ids[:, :-t], att[:, :-t], pos[:, :-t], use_cache=True)
        chunk = dec.decode_chunk(llm, llm.get_input_embeddings()(ids[:, -t:]), prefix.state, bidirectional=True)
        torch.testing.assert_close(chunk, whole, atol=1e-5, rtol=1e-5)
        # the first tail token sees the last one both ways, and only then
        changed = ids.clone()
        changed[:, -1] = 3 + (changed[:, -1] - 3 + 1) % 117
        again = _ours(llm, changed, att, pos, bidirectional_tail=t).hidden[:, -t]
        assert not torch.allclose(again, whole[:, 0])
        causal = _ours(llm, ids, att, pos).hidden[:, -t]
        torch.testing.assert_close(_ours(llm, changed, att, pos).hidden[:, -t], causal)


@pytest.mark.parametrize("family,layer", [("gemma2", 0), ("qwen2", 1), ("granite", 1)])
def test_attention_rows_match_eager_weights(family, layer):
    """The pruners' last-row attention equals transformers' eager weights (scaling, soft-cap, window)."""
    llm = tiny_causal_lm(family, attn="eager")
    ids, att, pos = _batch()
    saved = {}

    def hook(i, hidden, valid, p, inputs, cache):
        saved.update(inputs)
        return None

    with torch.no_grad():
        ref = llm(input_ids=ids, attention_mask=att, position_ids=pos, output_attentions=True).attentions[layer]
        _ours(llm, ids, att, pos, prune_layer=layer + 1, prune_hook=hook, keep_inputs_of=(layer,))
        h = saved[layer]
        keys = dec.layer_keys(llm, layer, h, pos)
        rows = dec.attention_rows(llm, layer, dec.layer_query_rows(llm, layer, h[:, -1:], pos[:, -1:]), keys, att)
    torch.testing.assert_close(rows[:, :, 0], ref[:, :, -1].float(), atol=1e-5, rtol=1e-5)
    if dec.layer_windows(llm)[layer]:
        assert (rows[:, :, 0, : ids.shape[1] - 6] == 0).all()  # outside the window


def test_grad_checkpointing_gives_the_same_gradients():
    """Layers are called by keyword (Gemma2 orders its arguments differently), with and without checkpointing."""
    llm = tiny_causal_lm("gemma2")
    ids, att, pos = _batch()
    grads = []
    for ckpt in (False, True):
        llm.zero_grad()
        out = _ours(llm, ids, att, pos, grad_checkpointing=ckpt)
        dec.lm_logits(llm, out.hidden)[att.bool()].logsumexp(-1).sum().backward()
        grads.append(llm.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_unsupported_family_is_refused():
    from transformers import AutoModelForCausalLM

    phi3 = AutoModelForCausalLM.from_config(tiny_text_config("phi3", pad_token_id=0, bos_token_id=1))
    with pytest.raises(dec.UnsupportedLLMError, match=r"'phi3'.*gemma, gemma2, granite, llama, mistral, qwen2, qwen3"):
        dec.decoder_parts(phi3)


def test_unsupported_configurations_are_refused():
    llm = tiny_causal_lm("qwen2")
    llm.config.layer_types = ["full_attention", "chunked_attention", "full_attention"]
    with pytest.raises(dec.UnsupportedLLMError, match="chunked_attention"):
        dec.decoder_parts(llm)
    llm = tiny_causal_lm("qwen2")
    llm.config.sliding_window = None
    with pytest.raises(dec.UnsupportedLLMError, match="sliding_window is None"):
        dec.decoder_parts(llm)
    llm = tiny_causal_lm("llama")
    llm.config._attn_implementation = "flash_attention_2"
    with pytest.raises(dec.UnsupportedLLMError, match="flash_attention_2"):
        dec.decoder_parts(llm)
    gemma2 = tiny_causal_lm("gemma2")
    gemma2.config._attn_implementation = "sdpa"  # transformers refuses it too: SDPA drops the score soft-cap
    with pytest.raises(dec.UnsupportedLLMError, match="eager"):
        dec.decoder_parts(gemma2)
    with pytest.raises(ValueError, match="convention"):
        dec.lm_logits(tiny_causal_lm("llama"), torch.zeros(1, 64), convention="gpt")


def test_mllm_build_refuses_an_untested_family():
    from mmtok import registries

    with pytest.raises(dec.UnsupportedLLMError, match="phi3"):
        registries.get("mllm").create(
            "llava",
            llm={
                "model_type": "phi3",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 128,
                "pad_token_id": 0,
                "bos_token_id": 1,
                "eos_token_id": 2,
            },
            image_token_id=120,
        )


def test_cache_keyword_follows_the_layer_signature():
    """transformers renamed the layers' ``past_key_values`` to ``cache``; a misnamed one is silently dropped."""
    from mmtok.mllm.decoder import _cache_keyword

    class Old(torch.nn.Module):
        def forward(self, hidden, attention_mask=None, past_key_values=None, **kwargs):
            return hidden

    class New(torch.nn.Module):
        def forward(self, hidden, attention_mask=None, cache=None, **kwargs):
            return hidden

    assert _cache_keyword(Old) == "past_key_values" and _cache_keyword(New) == "cache"


# --------------------------------------------------------------------------------------------------------------
# host-overhead rewrites: each equals the straightforward construction it replaced (tools/bench/decode.py times them)
# --------------------------------------------------------------------------------------------------------------
def _reference_mask(valid, q, dtype, key_pos=None, query_pos=None, window=None, tail=0):
    """The additive mask written entry by entry: causal by index, bidirectional tail, window on positions."""
    b, s = valid.shape
    out = torch.full((b, 1, q, s), torch.finfo(dtype).min, dtype=dtype)
    for i in range(b):
        for qi in range(q):
            qs = s - q + qi  # the query is key index qs
            for k in range(s):
                ok = bool(valid[i, k]) and (k <= qs or (tail and qs >= s - tail and k >= s - tail))
                if window is not None:
                    ok = ok and int(query_pos[i, qi] - key_pos[i, k]) < window
                if ok:
                    out[i, 0, qi, k] = 0.0
    return out


@pytest.mark.parametrize("queries,window,tail", [(1, None, 0), (1, 3, 0), (1, None, 1), (4, None, 0), (4, 3, 2)])
def test_additive_mask_equals_its_entrywise_definition(queries, window, tail):
    torch.manual_seed(0)
    valid = torch.rand(3, 9) > 0.3
    key_pos = torch.randint(0, 20, (3, 9)).sort(dim=1).values
    query_pos = key_pos[:, -queries:]
    got = dec.additive_mask(
        valid,
        queries,
        torch.float32,
        key_pos=key_pos,
        query_pos=query_pos,
        sliding_window=window,
        bidirectional_tail=tail,
    )
    want = _reference_mask(valid, queries, torch.float32, key_pos, query_pos, window, tail)
    assert torch.equal(got, want)
    assert not torch.signbit(got[got == 0]).any()  # +0.0, as the zeros it used to start from


def test_group_of_each_layer():
    state = dec.DecodeState(cache=None, group_start=[0, 3], key_valid=[], key_pos=[], next_pos=torch.zeros(1))
    assert [state.group_of(i) for i in range(6)] == [0, 0, 0, 1, 1, 1]
    state.group_start = [0]
    assert [state.group_of(i) for i in range(4)] == [0] * 4


def _expand_per_row(ids, att, labels, image_id, n, pad_id):
    """The per-sample loop expand_image_tokens used to run (the reference for its batched form)."""
    from mmtok.mllm.modeling import IGNORE_INDEX

    rows, labs = [], []
    for i in range(ids.shape[0]):
        keep = att[i].bool()
        row = ids[i][keep]
        at = int((row == image_id).nonzero()[0])
        rows.append(torch.cat([row[:at], row.new_full((n,), image_id), row[at + 1 :]]))
        if labels is not None:
            lab = labels[i][keep]
            labs.append(torch.cat([lab[:at], lab.new_full((n,), IGNORE_INDEX), lab[at + 1 :]]))
    length = max(len(r) for r in rows)
    out = ids.new_full((len(rows), length), pad_id)
    out_att = att.new_zeros((len(rows), length))
    out_lab = labels.new_full((len(rows), length), IGNORE_INDEX) if labels is not None else None
    for i, r in enumerate(rows):
        out[i, length - len(r) :] = r
        out_att[i, length - len(r) :] = 1
        if out_lab is not None:
            out_lab[i, length - len(r) :] = labs[i]
    return out, out_att, out_lab


@pytest.mark.parametrize("with_labels", [True, False])
def test_expand_image_tokens_equals_the_per_row_expansion(with_labels):
    from mmtok.mllm.modeling import expand_image_tokens

    torch.manual_seed(0)
    image_id, n = 99, 5
    ids = torch.randint(3, 50, (4, 11))
    att = torch.ones_like(ids)
    att[1, :4] = 0  # left padding
    att[2, :1] = 0
    att[3, 6] = 0  # a hole inside the prompt is dropped like padding
    for i, at in enumerate([0, 7, 10, 3]):  # the placeholder first, inside, last
        ids[i, at] = image_id
    labels = torch.randint(3, 50, ids.shape) if with_labels else None
    got = expand_image_tokens(ids, att, labels, image_id, n, pad_id=1)
    want = _expand_per_row(ids, att, labels, image_id, n, 1)
    for g, w in zip(got, want):
        assert (g is None and w is None) or (g.dtype == w.dtype and torch.equal(g, w))
    assert expand_image_tokens(got[0], got[1], got[2], image_id, n)[0] is got[0]  # n placeholders pass as they are


def test_expand_image_tokens_refuses_bad_placeholders():
    from mmtok.mllm.modeling import expand_image_tokens

    ids = torch.tensor([[5, 99, 6], [5, 99, 99]])
    with pytest.raises(ValueError, match="exactly one <image> placeholder"):
        expand_image_tokens(ids, torch.ones_like(ids), None, 99, 4)
    ids = torch.tensor([[99, 5, 6]])
    with pytest.raises(ValueError, match="padded position"):
        expand_image_tokens(ids, torch.tensor([[0, 1, 1]]), None, 99, 4)


def test_sequence_keep_equals_nonzero_selection():
    from mmtok.mllm.modeling import sequence_keep

    torch.manual_seed(0)
    b, seq_len, n, k = 3, 30, 12, 5
    positions = torch.stack([torch.randperm(seq_len)[:n].sort().values for _ in range(b)])
    keep = torch.stack([torch.randperm(n)[:k].sort().values for _ in range(b)])
    mask = torch.ones(b, seq_len, dtype=torch.bool)
    mask.scatter_(1, positions, False)
    mask.scatter_(1, positions.gather(1, keep), True)
    assert torch.equal(sequence_keep(keep, positions, seq_len), mask.nonzero()[:, 1].view(b, -1))


def test_generate_returns_ordinary_tensors_and_stops_when_every_row_ends():
    """generate runs in inference mode; its outputs must still be usable by autograd afterwards."""
    from mmtok import registries

    torch.manual_seed(0)
    model = registries.get("mllm").create("llava", image_token_id=127).eval()
    ids = torch.tensor([[5, 127, 6, 7], [8, 9, 127, 10]])
    images = torch.rand(2, 3, 32, 32)
    first = model.generate(ids, images, max_new_tokens=6, eos_token_id=[])
    assert first.sequences.shape == (2, 6) and not first.sequences.is_inference()
    # every row ends at its first token: one step, as before the rewrite
    stop = model.generate(ids, images, max_new_tokens=6, eos_token_id=first.sequences[:, 0].tolist())
    assert torch.equal(stop.sequences, first.sequences[:, :1])
    loss = model.llm.get_input_embeddings()(first.sequences).sum()  # the embedding saves its indices for backward
    loss.backward()
    assert model.llm.get_input_embeddings().weight.grad is not None

"""Contract tests over every registered tokenizer and quantizer (tiny configs, CPU)."""

from __future__ import annotations

import pytest
import torch

from mmtok import hub, registries
from mmtok.tokenizers.quantizers import codebook_stats, nearest_code

TOKENIZERS = registries.get("tokenizer")
QUANTIZERS = registries.get("quantizer")


def tiny(name: str) -> dict:
    """Shrink any registered tokenizer to test size, keeping its family, quantizer and downsampling."""
    cfg = TOKENIZERS.build_config(name)
    over: dict = {"codebook_size": 64, "image_size": 16}
    if hasattr(cfg, "downsample"):
        over.update(base_channels=8, image_size=max(16, 2 * cfg.downsample), num_res_blocks=1)
    else:
        over.update(width=32, depth=2, num_heads=2, patch_size=4, num_latent_tokens=8, latent_dim=8)
    if cfg.quantizer == "fsq":
        over["levels"] = [5, 5, 3]
    return over


@pytest.fixture(params=TOKENIZERS.list())
def model(request):
    torch.manual_seed(0)
    return TOKENIZERS.create(request.param, **tiny(request.param))


def _images(m, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, s = m.config.in_channels, m.config.image_size
    return torch.rand(b, c, s, s, generator=g) * 2 - 1


def test_registry_names_follow_the_convention():
    names = TOKENIZERS.list()
    for fam in ("vq_small_f4", "vq_small_f8", "titok_tiny_k32", "pca1d_tiny_k16"):
        assert fam in names
    assert all(len(n.split("_")) >= 3 for n in names)
    assert set(QUANTIZERS.list()) >= {"vq", "rvq", "fsq"}


def test_forward_backward_shapes(model):
    x = _images(model)
    model.train()
    out = model(x)
    assert out.recon.shape == x.shape
    assert out.indices.shape[: 1 + len(model.tokens_shape)] == (3, *model.tokens_shape)
    assert out.indices.dtype == torch.long and 0 <= out.indices.min() and out.indices.max() < model.codebook_size
    loss = (out.recon - x).abs().mean() + out.losses["quant"]
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "encoder" in n and p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the encoder"
    stats = model.codebook_stats()
    assert 0 < stats["usage"] <= 1 and stats["perplexity"] >= 1


def test_decode_indices_equals_decode_latents(model):
    model.train()
    model(_images(model))  # k-means init of the codebook
    model.eval()
    with torch.no_grad():
        enc = model.encode(_images(model, seed=1))
        assert torch.equal(model.decode_indices(enc.indices), model.decode(enc.latents))


def test_save_load_roundtrip_and_determinism(model, tmp_path):
    model.train()
    model(_images(model))
    model.eval()
    path = model.save_pretrained(tmp_path / "tok")
    back = hub.from_pretrained(path, kind="tokenizer").eval()
    assert type(back) is type(model) and back.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    x = _images(model, seed=2)
    with torch.no_grad():
        assert torch.equal(model.encode(x).indices, back.encode(x).indices)
        assert torch.equal(model(x).recon, back(x).recon)
    name = model.hub_name
    torch.manual_seed(5)
    m1 = TOKENIZERS.create(name, **tiny(name))
    torch.manual_seed(5)
    m2 = TOKENIZERS.create(name, **tiny(name))
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_bad_input_shape_is_a_clear_error():
    m = TOKENIZERS.create("vq_tiny_f4", **tiny("vq_tiny_f4"))
    with pytest.raises(ValueError, match=r"expects images \[B, 1, 16, 16\]"):
        m.encode(torch.zeros(2, 3, 16, 16))
    with pytest.raises(Exception, match="Did you mean 'codebook_size'"):
        TOKENIZERS.create("vq_tiny_f4", codebok_size=3)


@pytest.mark.parametrize("kind", ["vq", "rvq", "fsq"])
def test_quantizer_fp32_under_autocast_and_stats(kind):
    q = QUANTIZERS.create(kind, dim=16, codebook_size=32, codebook_dim=8, usage_window=1000, levels=[5, 5, 3])
    x = torch.randn(2, 40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x.bfloat16())
    assert out.quantized.dtype == torch.float32
    assert q.stats()["usage"] > 0
    q.eval()
    with torch.no_grad():
        o = q(x)
        assert torch.equal(q.indices_to_latents(o.indices), o.quantized)
    q.reset_stats()
    assert q.stats()["usage"] == 0


@pytest.mark.parametrize("cosine", [False, True])
def test_chunked_nearest_code_matches_brute_force(cosine):
    g = torch.Generator().manual_seed(0)
    x, cb = torch.randn(500, 8, generator=g), torch.randn(300, 8, generator=g)
    if cosine:
        x, cb = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(cb, dim=-1)
        want = (x @ cb.t()).argmax(-1)
    else:
        want = torch.cdist(x, cb).argmin(-1)
    got = nearest_code(x, cb, cosine, chunk_bytes=300 * 4 * 7)  # 7 rows per chunk
    assert (got == want).float().mean() > 0.998  # ties / rounding may flip a rare near-equidistant pair


def test_codebook_stats_hand_computed():
    s = codebook_stats(torch.tensor([0, 0, 1, 1]), 4)
    assert s["usage"] == 0.5 and abs(s["perplexity"] - 2.0) < 1e-9
    s = codebook_stats(torch.tensor([3, 3, 3]), 4)
    assert s["usage"] == 0.25 and abs(s["perplexity"] - 1.0) < 1e-9
    # usage_ge4 counts codes hit at least 4 times: code 0 (5 hits) yes, 1 (3 hits) and 2 (1 hit) no
    s = codebook_stats(torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, -1]), 8)
    assert s["usage"] == 3 / 8 and s["usage_ge4"] == 1 / 8 and s["assignments"] == 9  # -1 = empty slot


def test_codebook_stats_count_only_the_last_window():
    # every code once, then code 0 for a whole window: the window sees code 0 only
    ids = torch.cat([torch.arange(8), torch.zeros(100, dtype=torch.long)])
    s = codebook_stats(ids, 8, window=100)
    assert s["usage"] == 1 / 8 and s["usage_ge4"] == 1 / 8 and s["perplexity"] == 1.0 and s["assignments"] == 100
    # counting all assignments (the old evaluation) would give 100% here
    assert codebook_stats(ids, 8, window=108)["usage"] == 1.0
    # the default window is LlamaGen's 65,536: usage cannot grow past it with more data
    many = torch.cat([torch.arange(8), torch.zeros(65536, dtype=torch.long)])
    assert codebook_stats(many, 8)["usage"] == 1 / 8
    with pytest.raises(ValueError, match="window"):
        codebook_stats(ids, 8, window=0)


def test_codebook_stats_average_residual_levels():
    # level 0 uses codes {0, 1} (4 hits each), level 1 uses {0, 1, 2, 3} (2 hits each); [8, Q=2]
    ids = torch.stack([torch.tensor([0, 1] * 4), torch.tensor([0, 1, 2, 3] * 2)], dim=-1)
    s = codebook_stats(ids, 4, levels=2)
    assert s["usage"] == (2 / 4 + 4 / 4) / 2 and s["usage_ge4"] == (2 / 4 + 0) / 2
    assert abs(s["perplexity"] - 3.0) < 1e-9  # (2 + 4) / 2


def test_usage_right_after_kmeans_init_is_qualified_by_usage_ge4():
    # k-means init on the first batch places every code on a cluster of that batch, so nearly every code
    # is hit once: usage reads ~100% by construction; codes hit >= 4 times tell the real story
    torch.manual_seed(0)
    q = QUANTIZERS.create("vq", dim=16, codebook_size=32, usage_window=1000)
    q(torch.randn(1, 48, 16))
    st = q.stats()
    assert st["usage"] >= 0.75, st
    assert st["usage_ge4"] <= 0.25, st
    assert set(st) == {"usage", "usage_ge4", "perplexity", "assignments"} and st["assignments"] == 48


def test_usage_window_slides():
    q = QUANTIZERS.create("fsq", dim=4, levels=[5, 3], usage_window=10)
    q._record(torch.arange(15))
    assert sorted(q._recent[:, 0].tolist()) == list(range(5, 15))


def _dead_code_setup(reset: float):
    """A 4-code VQ (2-dim, Euclidean, no k-means) whose code 3 is dead: EMA sizes [10, 10, 10, 0.5]."""
    torch.manual_seed(0)
    q = QUANTIZERS.create(
        "vq",
        dim=2,
        codebook_size=4,
        kmeans_init=False,
        use_cosine_sim=False,
        decay=0.9,
        threshold_ema_dead_code=2.0,
        reset_cluster_size=reset,
        rotation_trick=False,
        usage_window=100,
    )
    cb = q.vq._codebook
    embed = torch.tensor([[[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0], [0.0, -4.0]]])  # [1, K, d]
    cb.embed.copy_(embed)
    cb.cluster_size.copy_(torch.tensor([[10.0, 10.0, 10.0, 0.5]]))
    cb.embed_avg.copy_(embed * cb.cluster_size[..., None])
    return q, cb


@pytest.mark.parametrize("reset", [0.0, 6.0])
def test_restarted_code_starts_at_reset_cluster_size(reset):
    q, cb = _dead_code_setup(reset)
    near_0 = torch.tensor([4.0, 0.1]).expand(1, 8, 2)  # every vector goes to code 0
    q(near_0)
    # code 3: 0.9 * 0.5 + 0.1 * 0 = 0.45 < 2 -> moved onto a batch vector, EMA size = reset (0: the threshold)
    start = reset or 2.0
    assert cb.cluster_size[0, 3] == pytest.approx(start)
    assert torch.allclose(cb.embed[0, 3], torch.tensor([4.0, 0.1]))
    near_1 = torch.tensor([-4.0, 0.1]).expand(1, 8, 2)  # a step in which the restarted code gets no hit
    q(near_1)
    if reset:  # 0.9 * 6 = 5.4 >= 2: it keeps its place and gets time to win a region
        assert cb.cluster_size[0, 3] == pytest.approx(0.9 * reset)
        assert torch.allclose(cb.embed[0, 3], torch.tensor([4.0, 0.1]))
    else:  # library default: 0.9 * 2 = 1.8 < 2, restarted again at once (now onto a vector near code 1)
        assert cb.cluster_size[0, 3] == pytest.approx(2.0)
        assert torch.allclose(cb.embed[0, 3], torch.tensor([-4.0, 0.1]))


def test_reset_cluster_size_below_threshold_is_refused_and_reaches_every_residual_level():
    with pytest.raises(ValueError, match="below threshold_ema_dead_code"):
        QUANTIZERS.create("vq", dim=8, codebook_size=16, threshold_ema_dead_code=2.0, reset_cluster_size=1.0)
    with pytest.raises(ValueError, match="reset_cluster_size must be >= 0"):
        QUANTIZERS.create("vq", dim=8, codebook_size=16, reset_cluster_size=-1.0)
    q = QUANTIZERS.create("rvq", dim=8, codebook_size=16, num_quantizers=3, reset_cluster_size=5.0)
    assert [layer._codebook.reset_cluster_size for layer in q.rvq.layers] == [5.0] * 3
    # the tokenizer config carries it to its quantizer
    m = TOKENIZERS.create("vq_tiny_f4", **tiny("vq_tiny_f4"), reset_cluster_size=3.0)
    assert m.quantizer.vq._codebook.reset_cluster_size == 3.0


def test_dead_code_threshold_is_compared_with_the_uniform_rate(caplog):
    import logging

    q = QUANTIZERS.create("vq", dim=8, codebook_size=32, threshold_ema_dead_code=2.0)
    with caplog.at_level(logging.INFO, logger="mmtok.tokenizers.quantizers"):
        q(torch.randn(1, 48, 8))  # 48 vectors into 32 codes: 1.5 hits per code and step < threshold 2
        q(torch.randn(1, 48, 8))  # said once, not every step
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "uniform use" in r.getMessage()]
    assert len(warnings) == 1 and "1.50" in warnings[0].getMessage()
    caplog.clear()
    q = QUANTIZERS.create("vq", dim=8, codebook_size=32, threshold_ema_dead_code=2.0)
    with caplog.at_level(logging.INFO, logger="mmtok.tokenizers.quantizers"):
        q(torch.randn(4, 64, 8))  # 8 hits per code and step: fine, only the info line
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("8.00 hits per code" in r.getMessage() for r in caplog.records)

"""The linear probe (a converged multinomial logistic regression, and a C grid that brackets the optimum) and the
fine-tune's parts (layer-wise lr decay, drop path, augmentation) and loop."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from mmtok.mim.probe import (
    add_finetune_args,
    attentive_probe,
    augment_batch,
    extract_features,
    extract_tokens,
    finetune,
    finetune_kwargs,
    fit_logistic,
    layer_decay_param_groups,
    layer_id,
    linear_probe,
    standardize,
    with_drop_path,
)
from mmtok.mim.vit import ViTConfig, ViTEncoder


def _weak_signal(n: int, rng: np.random.Generator, flip: float) -> tuple[np.ndarray, np.ndarray]:
    """Two classes whose signal is spread thinly over 150 dims (shift 0.25 each), labels flipped with prob ``flip``.

    With 200 noisy training samples the test accuracy against C (dense scikit-learn sweep, 20,000 clean test
    samples) is 0.50 at C=1e-4 (the weights vanish, every sample gets the majority class), 0.87 at 1e-3 and
    1e-2, 0.74 at 0.1 and 0.68 at 100 (the flipped labels are fitted): the optimum lies in [1e-3, 1e-2].
    """
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, 150)) + 0.25 * (2.0 * y - 1)[:, None]
    return x, np.where(rng.random(n) < flip, 1 - y, y)


def test_fit_converges_on_a_separable_problem():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 6, (3, 5))
    y = rng.integers(0, 3, 300)
    x = centres[y] + rng.normal(0, 1, (300, 5))
    (tx,) = standardize(x)
    fit = fit_logistic(tx, torch.as_tensor(y), C=100.0, num_classes=3, tol=1e-6)
    assert fit.converged and fit.grad_max <= 1e-6 and fit.iterations > 0
    assert (fit.logits(tx).argmax(-1) == torch.as_tensor(y)).all()
    r = linear_probe(x[:200], y[:200], x[200:], y[200:])
    assert r.converged and r.all_converged and r.accuracy == 1.0
    # separable: every C classifies the held-out part perfectly, so the tie-break (log-loss) drives C upwards
    assert r.C >= 10.0 and len(r.grid) > 5


def test_same_solution_as_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    n, d, k = 600, 12, 4
    w = rng.normal(0, 1, (d, k))
    x = rng.normal(0, 1, (n, d)) * rng.uniform(0.5, 3.0, d) + 2.0  # unequal scales: standardising matters
    y = (x @ w / 3 + rng.gumbel(size=(n, k))).argmax(1)  # noisy labels: not separable
    xtr, ytr, xte, yte = x[:400], y[:400], x[400:], y[400:]
    scaler = StandardScaler().fit(xtr)
    ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(scaler.transform(xtr), ytr)

    tx, vx = standardize(xtr, xte)
    np.testing.assert_allclose(tx.numpy(), scaler.transform(xtr), atol=1e-12)
    fit = fit_logistic(tx, torch.as_tensor(ytr), 0.5, k, tol=1e-7)
    assert fit.converged
    np.testing.assert_allclose(fit.weight.numpy().T, ref.coef_, atol=1e-5)
    prob = fit.logits(vx).softmax(-1).numpy()
    np.testing.assert_allclose(prob, ref.predict_proba(scaler.transform(xte)), atol=1e-6)
    # a single C is used as given: the probe refits on all of train and scores what scikit-learn scores
    r = linear_probe(xtr, ytr, xte, yte, Cs=(0.5,))
    assert r.converged and np.isnan(r.val_accuracy) and r.grid == []
    assert r.accuracy == pytest.approx(ref.score(scaler.transform(xte), yte))
    np.testing.assert_array_equal(r.predictions, ref.predict(scaler.transform(xte)))
    # predictions come back in the caller's label values, not the probe's internal 0..K-1
    r = linear_probe(xtr, ytr + 10, xte, yte + 10, Cs=(0.5,))
    np.testing.assert_array_equal(r.predictions, ref.predict(scaler.transform(xte)) + 10)
    assert r.accuracy == pytest.approx(float((r.predictions == yte + 10).mean()))


@pytest.mark.parametrize("start", [(1e-6, 1e-5), (10.0, 100.0)])
def test_grid_extends_until_the_optimum_is_interior(start):
    rng = np.random.default_rng(0)
    xtr, ytr = _weak_signal(200, rng, flip=0.25)
    xte, yte = _weak_signal(4000, rng, flip=0.0)
    r = linear_probe(xtr, ytr, xte, yte, Cs=start, val_fraction=0.3, max_extend=5)
    tried = [g[0] for g in r.grid]
    assert not r.C_at_edge and min(tried) < r.C < max(tried)
    assert 1e-3 <= r.C <= 1e-2 + 1e-12  # where the dense sweep puts the optimum (see _weak_signal)
    assert len(tried) > len(start) + 2  # extended, then refined
    assert r.all_converged and r.accuracy > 0.84
    # held-out accuracy at the chosen C beats both ends of the grid
    acc = {g[0]: g[1] for g in r.grid}
    assert r.val_accuracy > max(acc[min(tried)], acc[max(tried)])


def test_grid_edge_is_reported_when_extensions_run_out(caplog):
    rng = np.random.default_rng(0)
    xtr, ytr = _weak_signal(200, rng, flip=0.25)
    xte, yte = _weak_signal(500, rng, flip=0.0)
    with caplog.at_level(logging.WARNING, logger="mmtok.mim.probe"):
        r = linear_probe(xtr, ytr, xte, yte, Cs=(1e-7, 1e-6), val_fraction=0.3, max_extend=1)
    assert r.C_at_edge and len(r.grid) == 3
    assert "edge of the grid" in caplog.text


def test_probe_rejects_bad_input():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="differ in length"):
        linear_probe(x, np.zeros(9), x, np.zeros(10))
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe(x, np.zeros(10), x, np.zeros(10))
    with pytest.raises(ValueError, match="positive"):
        linear_probe(x, np.arange(10) % 2, x, np.zeros(10), Cs=(0.0, 1.0))


# -- fine-tuning -----------------------------------------------------------------------------------
def _tiny_encoder(depth: int = 3, drop_path: float = 0.0) -> ViTEncoder:
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=depth, num_heads=2, drop_path=drop_path)
    return ViTEncoder(cfg)


class _WithHead(torch.nn.Module):
    def __init__(self, encoder: ViTEncoder):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.embed_dim, 10)


def test_layer_decay_scales_each_layer():
    depth, decay = 3, 0.5
    model = _WithHead(_tiny_encoder(depth))
    groups = layer_decay_param_groups(model, depth, weight_decay=0.05, layer_decay=decay)
    scale_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(scale_of) == len(named)  # every trainable parameter is in exactly one group
    # hand-computed: scale = decay ** (depth + 1 - layer), layer 0 = embeddings, i + 1 = block i, depth + 1 = top
    expected = {
        "encoder.patch_embed.proj.weight": (0.0625, 0.05),
        "encoder.cls_token": (0.0625, 0.0),
        "encoder.blocks.0.attn.qkv.weight": (0.125, 0.05),
        "encoder.blocks.0.norm1.weight": (0.125, 0.0),
        "encoder.blocks.2.mlp.fc2.bias": (0.5, 0.0),
        "encoder.norm.weight": (1.0, 0.0),
        "head.weight": (1.0, 0.05),
        "head.bias": (1.0, 0.0),
    }
    for name, want in expected.items():
        assert scale_of[id(named[name])] == pytest.approx(want), name
    assert [layer_id(n, depth) for n in ("blocks.1.mlp.fc1.weight", "encoder.blocks.1.norm2.bias")] == [2, 2]
    # no decay: one scale everywhere
    flat = layer_decay_param_groups(model, depth, weight_decay=0.05, layer_decay=1.0)
    assert {g["lr_scale"] for g in flat} == {1.0}
    with pytest.raises(ValueError, match="layer_decay"):
        layer_decay_param_groups(model, depth, weight_decay=0.05, layer_decay=0.0)


def test_drop_path_active_in_train_only():
    enc = _tiny_encoder(depth=3)
    dropped = with_drop_path(enc, 0.5)
    assert dropped.config.drop_path == 0.5 and enc.config.drop_path == 0.0
    # the rate grows linearly from 0 at the first block to the config's value at the last
    rates = [blk.drop_path1.drop_prob if hasattr(blk.drop_path1, "drop_prob") else 0.0 for blk in dropped.blocks]
    assert rates == pytest.approx([0.0, 0.25, 0.5])
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        ref = enc.eval()(x)
        assert torch.equal(dropped.eval()(x), ref)  # same weights, inert in eval
        dropped.train()
        torch.manual_seed(0)
        a = dropped(x)
        torch.manual_seed(1)
        b = dropped(x)
    assert not torch.allclose(a, b) and not torch.allclose(a, ref)  # random in train
    with pytest.raises(ValueError, match="drop_path"):
        with_drop_path(enc, 1.0)


def test_augment_keeps_shape_range_and_content():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 10:18, 6:20] = torch.rand(64, 1, 8, 14)  # an item away from the border, on a 0 background
    out = augment_batch(x, g, flip=True, shift=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    # a shift of at most 2 px keeps the item inside the frame: every image keeps its pixel sum (up to the flip)
    torch.testing.assert_close(out.sum((1, 2, 3)), x.sum((1, 2, 3)))
    # each output is its input flipped or not and translated by offsets within [-2, 2]; both happen
    found, moved, mirrored = 0, 0, 0
    for i in range(64):
        for flip in (False, True):
            src = x[i].flip(-1) if flip else x[i]
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    if torch.equal(torch.roll(src, (dy, dx), (-2, -1)), out[i]):
                        found, moved, mirrored = found + 1, moved + ((dy, dx) != (0, 0)), mirrored + flip
    assert found == 64 and moved > 40 and 16 < mirrored < 48
    assert torch.equal(augment_batch(x, g, flip=False, shift=0), x)  # both off: unchanged


def test_finetune_learns_and_reports():
    """A tiny encoder fine-tuned for a few seconds on two easy synthetic classes (bright left vs right half)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 600)
    imgs = (rng.random((600, 28, 28)) * 60).astype(np.uint8)
    for i, c in enumerate(y):
        imgs[i, 6:22, (2 if c == 0 else 16) : (12 if c == 0 else 26)] += 180
    enc = _tiny_encoder(depth=2)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    out = finetune(
        enc,
        imgs[:500],
        y[:500],
        imgs[500:],
        y[500:],
        num_classes=2,
        epochs=4,
        batch_size=50,
        lr=3e-3,
        flip=False,  # a mirror image would swap the two classes
        drop_path=0.1,
        mixup=0.2,
        time_budget_s=60.0,
    )
    assert out["steps"] == out["planned_steps"] == 40 and out["epochs_done"] == pytest.approx(4.0)
    assert out["accuracy"] > 0.9 and 0.0 <= out["accuracy_flip_tta"] <= 1.0 and out["drop_path"] == 0.1
    # the caller's encoder (no drop path of its own) holds the fine-tuned weights
    assert enc.config.drop_path == 0.0
    assert any(not torch.equal(before[k], v) for k, v in enc.state_dict().items())
    with pytest.raises(ValueError, match="mixup"):
        finetune(enc, imgs[:10], y[:10], imgs[:10], y[:10], num_classes=2, mixup=-1.0)


def test_finetune_cli_options_map_onto_finetune():
    """The shared ``--finetune-*`` options: their defaults are finetune()'s own (bar the planned epochs, which the
    time budget caps), and every option reaches its keyword."""
    import argparse
    import inspect

    p = argparse.ArgumentParser()
    add_finetune_args(p)
    kwargs = finetune_kwargs(p.parse_args([]))
    sig = inspect.signature(finetune).parameters
    assert set(kwargs) <= set(sig)
    for name, value in kwargs.items():
        if name != "epochs":
            assert value == sig[name].default, name
    argv = ["--finetune-layer-decay", "0.75", "--finetune-no-flip", "--finetune-shift", "2", "--finetune-seed", "3"]
    kwargs = finetune_kwargs(p.parse_args(argv))
    assert (kwargs["layer_decay"], kwargs["flip"], kwargs["shift"], kwargs["seed"]) == (0.75, False, 2, 3)


def test_finetune_ema_scores_the_averaged_weights():
    """``ema``: the averaged copy is scored beside the live weights. A decay near 0 follows the live weights (same
    score); a decay near 1 stays at the first step's weights, which have not learnt the task yet."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 600)
    imgs = (rng.random((600, 28, 28)) * 60).astype(np.uint8)
    for i, c in enumerate(y):
        imgs[i, 6:22, (2 if c == 0 else 16) : (12 if c == 0 else 26)] += 180
    kw = dict(num_classes=2, epochs=4, batch_size=50, lr=3e-3, flip=False, time_budget_s=60.0)
    follow = finetune(_tiny_encoder(depth=2), imgs[:500], y[:500], imgs[500:], y[500:], ema=1e-6, **kw)
    assert follow["accuracy"] > 0.9 and follow["accuracy_ema"] == follow["accuracy"] and follow["ema"] == 1e-6
    frozen = finetune(_tiny_encoder(depth=2), imgs[:500], y[:500], imgs[500:], y[500:], ema=0.999999, **kw)
    assert frozen["accuracy"] > 0.9 and frozen["accuracy_ema"] < 0.75
    assert "accuracy_ema" not in finetune(_tiny_encoder(depth=2), imgs[:50], y[:50], imgs[:50], y[:50], **kw)
    with pytest.raises(ValueError, match="ema"):
        finetune(_tiny_encoder(depth=2), imgs[:10], y[:10], imgs[:10], y[:10], num_classes=2, ema=1.0)


# -- the attentive probe ---------------------------------------------------------------------------
def _marked_tokens(n: int, rng: np.random.Generator, length: int = 8, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Sets of ``length`` tokens, each naming a random class (one-hot in channels 1..k, plus noise); the label is
    the class of the one token whose channel 0 is raised. A mean over the set holds the marked token's class at
    weight 1 / length among the distractors' and cannot tell which one was marked; attention on channel 0 can."""
    x = np.zeros((n, length, k + 4), np.float32)
    cls = rng.integers(0, k, (n, length))
    x[np.arange(n)[:, None], np.arange(length)[None], 1 + cls] = 1.0
    marked = rng.integers(0, length, n)
    x[np.arange(n), marked, 0] = 3.0
    x += rng.normal(0, 0.1, x.shape).astype(np.float32)
    return x, cls[np.arange(n), marked]


def test_attentive_probe_reads_the_marked_token_where_mean_pooling_cannot():
    rng = np.random.default_rng(0)
    xtr, ytr = _marked_tokens(1500, rng)
    xte, yte = _marked_tokens(500, rng)
    r = attentive_probe(xtr, ytr, xte, yte, epochs=30, batch_size=64, lr=3e-3, heads=2)
    lin = linear_probe(xtr.mean(1), ytr, xte.mean(1), yte)
    assert r.accuracy >= 0.9, r
    assert lin.accuracy < 0.6, lin.accuracy  # same sets, pooled first: the marked token is lost
    assert 0.8 <= r.val_accuracy <= 1.0 and r.train_accuracy >= 0.9
    assert r.steps == 30 * int(np.ceil(1500 / 64)) and r.predictions.shape == (500,)
    again = attentive_probe(xtr, ytr, xte, yte, epochs=30, batch_size=64, lr=3e-3, heads=2)
    assert np.array_equal(again.predictions, r.predictions)  # seeded: the same probe twice


def test_attentive_probe_rejects_bad_input():
    rng = np.random.default_rng(0)
    x, y = _marked_tokens(40, rng)
    with pytest.raises(ValueError, match=r"tokens \[N, L, D\]"):
        attentive_probe(x.mean(1), y, x.mean(1), y)
    with pytest.raises(ValueError, match="differ in length"):
        attentive_probe(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="epochs"):
        attentive_probe(x, y, x, y, epochs=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        attentive_probe(x, np.zeros_like(y), x, y)
    with pytest.raises(ValueError, match="divisible"):
        attentive_probe(x, y, x, y, heads=3)


def test_extract_tokens_are_the_final_norm_patch_tokens():
    enc = ViTEncoder(ViTConfig(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2)).eval()
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    tokens = extract_tokens(enc, images, batch_size=4)
    assert tokens.shape == (6, 16, 32) and tokens.dtype == torch.float16
    pooled = torch.from_numpy(extract_features(enc, images))
    torch.testing.assert_close(tokens.float().mean(1), pooled, atol=2e-3, rtol=2e-3)
    first = extract_tokens(enc, images, layer=1)  # after block 1 of 2: not the last block's tokens
    assert not torch.allclose(first.float(), tokens.float(), atol=1e-2)
    with pytest.raises(ValueError, match="layer must index"):
        extract_tokens(enc, images, layer=5)

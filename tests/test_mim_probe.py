"""The linear probe: a converged multinomial logistic regression, and a C grid that brackets the optimum."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from mmtok.mim.probe import fit_logistic, linear_probe, standardize


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

"""Evaluating a masked-modeling encoder: frozen-feature linear probe, attentive probe and a short fine-tune.

The linear probe follows MAE's protocol in spirit (arXiv:2111.06377, sec. 4 and appendix A.2: features of
the frozen encoder, a linear classifier on them); MAE trains its probe with LARS and a BatchNorm without
affine parameters in front of the classifier, which is the same thing as standardising the features. Here
the classifier is an L2-regularised multinomial logistic regression solved to convergence on the full batch
with L-BFGS in float64 (torch), with the same objective as scikit-learn's ``LogisticRegression(C=...)``:
``C * sum_i CE_i + ||W||^2 / 2`` (the bias is not penalised). We minimise it divided by ``C * N`` (mean
cross-entropy plus ``||W||^2 / (2 C N)``), so the gradient tolerance does not depend on ``N`` or ``C``.

``C`` is chosen on a held-out part of the training set from a log-spaced grid that is extended, a bounded
number of times, while the best value sits at one of its edges (so the grid brackets the optimum), then
refined once between the best value and its neighbours; the classifier is refit on the whole training set
with the chosen ``C``. Every fit reports whether it reached the gradient tolerance: a probe that did not
converge is a lower bound, and :class:`ProbeResult` says so.

The attentive probe (:func:`attentive_probe`, V-JEPA's protocol in structure) trains a learned query that
cross-attends over the frozen patch tokens of one block, and a linear classifier on its output: it can pick the
tokens that carry the label where a mean-pooled feature mixes them with everything else (several items in a clip).

The fine-tune trains the whole encoder plus a linear head on mean-pooled final-norm features with MAE's recipe
(appendix A.2: AdamW, warm-up and cosine decay, label smoothing; layer-wise lr decay, drop path, small
translations and mixup as options) cut down to a small ViT, 28-px images and a wall-clock budget of minutes. The
options are off by default: a few-epoch fine-tune underfits and they cost accuracy there (see :func:`finetune`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import swa_utils

from mmtok.mim.vit import ViTEncoder

logger = logging.getLogger(__name__)

__all__ = [
    "AttentivePooler",
    "AttentiveProbeResult",
    "LogisticFit",
    "ProbeResult",
    "add_finetune_args",
    "attentive_probe",
    "augment_batch",
    "extract_features",
    "extract_tokens",
    "finetune",
    "finetune_kwargs",
    "fit_logistic",
    "layer_decay_param_groups",
    "layer_id",
    "linear_probe",
    "second_moments",
    "standardize",
    "to_input",
    "with_drop_path",
]

DEFAULT_CS = (1e-3, 1e-2, 0.1, 1.0, 10.0)


def to_input(images: np.ndarray | torch.Tensor, in_chans: int = 1) -> torch.Tensor:
    """uint8 ``[N, H, W]`` / ``[N, C, H, W]`` / ``[N, C, T, H, W]`` (or floats in [0, 1]) -> floats in [0, 1]."""
    x = images if torch.is_tensor(images) else torch.from_numpy(np.array(images, copy=True))
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim == 5:  # clips [N, C, T, H, W] are passed through
        return x
    if x.shape[1] != in_chans:
        x = x.mean(1, keepdim=True) if in_chans == 1 else x.expand(-1, in_chans, -1, -1)
    return x


@torch.no_grad()
def extract_features(
    encoder: ViTEncoder,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 512,
    pool: str = "mean",
    layers: int = 1,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Frozen features ``[N, D * layers]`` (see :meth:`ViTEncoder.pooled_features`) as float32 numpy."""
    encoder = encoder.eval().to(device)
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        x = chunk if torch.is_tensor(chunk) and chunk.is_floating_point() and chunk.ndim >= 4 else None
        x = to_input(chunk, encoder.config.in_chans) if x is None else x
        out.append(encoder.pooled_features(x.to(device), pool=pool, layers=layers).float().cpu())
    return torch.cat(out).numpy()


# -- the linear probe ------------------------------------------------------------------------------
@dataclass
class LogisticFit:
    """A multinomial logistic regression ``logits = x @ weight + bias``.

    Attributes:
        weight: ``[F, K]`` float64. bias: ``[K]`` float64 (not penalised).
        C: Inverse regularisation strength (scikit-learn's ``C``).
        iterations: L-BFGS iterations taken (over every restart).
        grad_max: Max absolute gradient of the objective divided by ``C * N`` at the solution.
        converged: ``grad_max <= tol``.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    C: float
    iterations: int
    grad_max: float
    converged: bool

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, F]`` (standardised like the training features) -> ``[N, K]``."""
        return x.to(self.weight) @ self.weight + self.bias


def standardize(
    train: np.ndarray | torch.Tensor, *others: np.ndarray | torch.Tensor, device: str | torch.device = "cpu"
) -> list[torch.Tensor]:
    """Float64 tensors ``(x - mean) / std`` with the train set's mean and (population) std; constant
    features keep std 1, as scikit-learn's ``StandardScaler`` does."""
    tr = torch.as_tensor(np.asarray(train), dtype=torch.float64, device=device)
    mean, std = tr.mean(0), tr.std(0, unbiased=False)
    std = torch.where(std > 1e-12 * mean.abs().clamp_min(1.0), std, torch.ones_like(std))
    out = [(tr - mean) / std]
    out += [(torch.as_tensor(np.asarray(o), dtype=torch.float64, device=device) - mean) / std for o in others]
    return out


def second_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition ``(eigenvalues [F], eigenvectors [F, F])`` of ``x^T x / N`` (the preconditioner's
    input; compute it once per design matrix and pass it to every :func:`fit_logistic` on that matrix)."""
    evals, evecs = torch.linalg.eigh(x.T @ x / len(x))
    return evals.clamp_min(0.0), evecs


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    C: float,
    num_classes: int,
    *,
    init: LogisticFit | None = None,
    max_iter: int = 1000,
    tol: float = 1e-5,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LogisticFit:
    """Minimise ``mean_i CE(x_i @ W + b, y_i) + ||W||^2 / (2 C N)`` with full-batch L-BFGS (strong Wolfe).

    The minimiser is scikit-learn's ``LogisticRegression(C=C)`` (multinomial, L2, unpenalised intercept).
    Correlated features make this problem badly conditioned (raw pixels took ~1,000 plain L-BFGS iterations
    per ``C``), so L-BFGS runs on ``V`` with ``W = P V``, ``P = (x^T x / N + lam I)^(-1/2)``: a change of
    variables, so the minimiser is unchanged, while the curvature seen by L-BFGS is close to isotropic.
    Convergence is judged on the gradient with respect to ``W`` itself.

    Args:
        x: ``[N, F]`` features (float64: the tolerance is meant for it). y: ``[N]`` int labels in
            ``[0, num_classes)``.
        init: A previous solution (e.g. at a neighbouring ``C``) to start from; zeros otherwise.
        max_iter: Iteration cap.
        tol: Converged when the max absolute gradient (over ``W`` and ``b``) is at most this.
        moments: :func:`second_moments` of ``x``, if already computed.
    """
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}")
    n, f = x.shape
    y = y.to(device=x.device, dtype=torch.long)
    evals, evecs = second_moments(x) if moments is None else moments
    reg = 1.0 / (2.0 * C * n)
    # the penalty's curvature (2 reg) over a typical softmax curvature (~0.1) keeps P bounded when x^T x is singular
    lam = 20.0 * reg + 1e-10
    scale = (evals + lam).rsqrt()
    p = (evecs * scale) @ evecs.T  # [F, F] = (S + lam I)^(-1/2)
    p_inv = (evecs / scale) @ evecs.T  # its inverse, to map gradients back: dL/dW = P^-1 dL/dV
    w0 = init.weight.to(x) if init is not None else x.new_zeros(f, num_classes)
    v = (p_inv @ w0).requires_grad_(True)  # [F, K]
    b = (init.bias.to(x).clone() if init is not None else x.new_zeros(num_classes)).requires_grad_(True)
    chunk = 20  # iterations between our own convergence checks
    opt = torch.optim.LBFGS(
        [v, b],
        lr=1.0,
        max_iter=chunk,
        history_size=20,
        tolerance_grad=tol * 1e-3,  # our check on dL/dW decides; this only guards against a zero gradient
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        w = p @ v
        loss = F.cross_entropy(x @ w + b, y) + reg * w.pow(2).sum()
        loss.backward()
        return loss

    def grad_max() -> float:
        objective()
        return float(max((p_inv @ v.grad).abs().max(), b.grad.abs().max()))

    iterations, g = 0, grad_max()
    while g > tol and iterations < max_iter:
        before = iterations
        opt.step(objective)
        iterations = int(opt.state[v]["n_iter"])
        g = grad_max()
        if iterations == before:  # the line search made no progress: as close as float64 gets
            break
    with torch.no_grad():
        w = p @ v
    return LogisticFit(w.detach(), b.detach(), float(C), iterations, g, g <= tol)


@dataclass
class ProbeResult:
    """What :func:`linear_probe` found.

    Attributes:
        accuracy: Test accuracy of the classifier refit on all of train with the chosen ``C``, in [0, 1].
        C: The chosen inverse regularisation.
        val_accuracy: Held-out accuracy of the chosen ``C`` (NaN when a single ``C`` was given: no tuning).
        fit_seconds: Wall time of the whole probe (standardising, tuning, refit, test).
        converged: The final fit reached the gradient tolerance (else ``accuracy`` is a lower bound).
        iterations: L-BFGS iterations of the final fit.
        grad_max: Max absolute gradient of the final fit (scaled objective, see :func:`fit_logistic`).
        all_converged: Every fit (tuning ones too) reached the tolerance.
        C_at_edge: The best ``C`` was still at an edge of the grid after the allowed extensions.
        grid: ``(C, held-out accuracy, held-out mean log-loss, converged)`` of every ``C`` tried, ascending.
        predictions: ``[N_test]`` predicted labels of the test samples (in ``train_y``'s label values), so a
            caller can break the accuracy down by subsets.
    """

    accuracy: float
    C: float
    val_accuracy: float
    fit_seconds: float
    converged: bool = True
    iterations: int = 0
    grad_max: float = 0.0
    all_converged: bool = True
    C_at_edge: bool = False
    grid: list[tuple[float, float, float, bool]] = field(default_factory=list)
    predictions: np.ndarray | None = None


def class_indices(
    train_y: np.ndarray, test_y: np.ndarray, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """``(classes, train indices, test indices)`` for any integer labels: indices into the sorted train classes;
    a test label unseen in train maps to -1 (it can never be predicted, so it counts as an error)."""
    classes, ytr = np.unique(np.asarray(train_y), return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"the probe needs at least 2 classes in train_y, got {classes.tolist()}")
    lookup = {c: i for i, c in enumerate(classes.tolist())}
    yte = [lookup.get(c, -1) for c in np.asarray(test_y).tolist()]
    return classes, torch.as_tensor(ytr, dtype=torch.long, device=device), torch.as_tensor(yte, device=device)


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    Cs: tuple[float, ...] = DEFAULT_CS,
    val_fraction: float = 0.1,
    tune_subset: int = 0,
    max_iter: int = 1000,
    tol: float = 1e-5,
    max_extend: int = 3,
    refine: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ProbeResult:
    """Standardise, choose C on a held-out part of train, refit on all of train, test.

    ``C`` is chosen by held-out accuracy (ties: lower held-out log-loss). While the best ``C`` is the smallest
    or largest tried, the grid is extended on that side by its own edge ratio, at most ``max_extend`` times
    per side; then, if ``refine``, the geometric midpoints between the best ``C`` and its neighbours are tried.
    A single ``C`` is used as given (no tuning).

    Args:
        train_x / test_x: ``[N, F]`` features. train_y / test_y: ``[N]`` int labels (any integers).
        Cs: Starting grid of inverse regularisation strengths (> 0).
        val_fraction: Share of train held out to choose ``C``.
        tune_subset: Fit the tuning models on at most this many samples (0 = all the rest of train).
        max_iter / tol: Per fit, see :func:`fit_logistic`.
    """
    t0 = time.perf_counter()
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(
            f"features and labels differ in length (train {len(train_x)} vs {len(train_y)}, "
            f"test {len(test_x)} vs {len(test_y)})"
        )
    cs = sorted({float(c) for c in Cs})
    if not cs or cs[0] <= 0:
        raise ValueError(f"Cs must be positive values, got {Cs}")
    classes, ytr_t, yte_t = class_indices(train_y, test_y, device)
    k = len(classes)
    # float64 throughout: in float32 a strongly regularised fit stalls above the tolerance, because the objective
    # changes it still needs (~1e-11) are below float32's resolution of a loss near 0.7
    tx, vx = standardize(train_x, test_x, device=device)

    fits: dict[float, tuple[LogisticFit, float, float]] = {}
    grid_info: list[tuple[float, float, float, bool]] = []
    best_c, best_acc = cs[0], math.nan
    if len(cs) > 1:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(tx))
        n_val = max(1, int(len(perm) * val_fraction))
        val_idx, fit_idx = perm[:n_val], perm[n_val:]
        if tune_subset:
            fit_idx = fit_idx[:tune_subset]
        fx, fy = tx[fit_idx], ytr_t[fit_idx]
        hx, hy = tx[val_idx], ytr_t[val_idx]
        moments = second_moments(fx)  # shared by every C: only the preconditioner's shift depends on C

        def evaluate(c: float) -> None:
            # warm start from the fitted C nearest in log scale: neighbouring solutions are close
            near = min(fits, key=lambda d: abs(math.log(d / c)), default=None)
            init = fits[near][0] if near else None
            fit = fit_logistic(fx, fy, c, k, init=init, max_iter=max_iter, tol=tol, moments=moments)
            logits = fit.logits(hx)
            acc = float((logits.argmax(-1) == hy).double().mean())
            loss = float(F.cross_entropy(logits, hy))
            fits[c] = (fit, acc, loss)
            logger.info("probe C=%.4g: held-out accuracy %.4f, log-loss %.4f (%d it)", c, acc, loss, fit.iterations)

        def best() -> float:
            return max(fits, key=lambda c: (fits[c][1], -fits[c][2]))

        for c in cs:
            evaluate(c)
        low_ratio, high_ratio = cs[1] / cs[0], cs[-1] / cs[-2]
        extended = {"low": 0, "high": 0}
        while True:
            tried, b = sorted(fits), best()
            if b == tried[0] and extended["low"] < max_extend:
                extended["low"] += 1
                evaluate(tried[0] / low_ratio)
            elif b == tried[-1] and extended["high"] < max_extend:
                extended["high"] += 1
                evaluate(tried[-1] * high_ratio)
            else:
                break
        tried, best_c = sorted(fits), best()
        at_edge = best_c in (tried[0], tried[-1])
        if refine and not at_edge:
            i = tried.index(best_c)
            for nb in (tried[i - 1], tried[i + 1]):
                evaluate(math.sqrt(best_c * nb))
            best_c = best()
        best_acc = fits[best_c][1]
        grid_info = [(c, fits[c][1], fits[c][2], fits[c][0].converged) for c in sorted(fits)]
        if at_edge:
            logger.warning(
                "probe: the best C=%g is still at the edge of the grid %s after %d extensions; the optimum may "
                "lie outside it",
                best_c,
                [f"{c:.3g}" for c in sorted(fits)],
                max_extend,
            )
    else:
        at_edge = False
    init = fits[best_c][0] if best_c in fits else None
    final = fit_logistic(tx, ytr_t, best_c, k, init=init, max_iter=max_iter, tol=tol)
    pred = final.logits(vx).argmax(-1)
    accuracy = float((pred == yte_t).double().mean())
    all_converged = final.converged and all(f[0].converged for f in fits.values())
    if not final.converged:
        logger.warning(
            "probe (C=%g) stopped after %d iterations with gradient %.2g > tol %.2g: its accuracy is a lower bound",
            best_c,
            final.iterations,
            final.grad_max,
            tol,
        )
    return ProbeResult(
        accuracy,
        best_c,
        best_acc,
        time.perf_counter() - t0,
        converged=final.converged,
        iterations=final.iterations,
        grad_max=final.grad_max,
        all_converged=all_converged,
        C_at_edge=at_edge,
        grid=grid_info,
        predictions=classes[pred.cpu().numpy()],
    )


# -- the attentive probe ---------------------------------------------------------------------------
@torch.no_grad()
def extract_tokens(
    encoder: ViTEncoder,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 64,
    layer: int = -1,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Frozen patch tokens ``[N, L, D]`` (float16, on the CPU) of one block, through the encoder's final norm.

    ``layer`` indexes :meth:`ViTEncoder.forward_features`' states: -1 = after the last block, 0 = the patch
    embeddings. Prefix tokens ([CLS]) are dropped. float16 halves the memory of a large token set (4,000 clips of
    256 tokens x 192 = 393 MB); the probe computes in float32.
    """
    encoder = encoder.eval().to(device)
    depth = len(encoder.blocks)
    if not -(depth + 1) <= layer <= depth:
        raise ValueError(f"layer must index one of the {depth + 1} states (-{depth + 1}..{depth}), got {layer}")
    p = encoder.num_prefix_tokens
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        x = chunk if torch.is_tensor(chunk) and chunk.is_floating_point() and chunk.ndim >= 4 else None
        x = to_input(chunk, encoder.config.in_chans) if x is None else x
        state = encoder.forward_features(x.to(device), output_hidden_states=True)[layer]
        out.append(encoder.norm(state)[:, p:].to("cpu", torch.float16))
    return torch.cat(out)


class AttentivePooler(nn.Module):
    """Attentive probe: learned queries cross-attend over frozen tokens, then a linear classifier.

    The structure of V-JEPA's attentive probe (Bardes et al., 2024): one pre-norm cross-attention block (the
    queries attend over the layer-normed tokens, residual on the queries, then a residual MLP), the queries'
    outputs averaged and classified by one linear layer. Unlike a mean-pooled linear probe it can weight the
    tokens that hold the class (one item among several, or the largest one) and ignore the rest.
    """

    def __init__(self, dim: int, num_classes: int, heads: int = 4, queries: int = 1, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"the token width {dim} must be divisible by heads={heads}")
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, queries, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, num_classes)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` -> ``[B, D]`` (the queries' outputs, averaged)."""
        b, _, d = tokens.shape
        h = self.heads
        kv = self.kv(self.norm_kv(tokens)).unflatten(-1, (2, h, d // h)).permute(2, 0, 3, 1, 4)  # [2, B, h, L, d/h]
        query = self.query.expand(b, -1, -1)
        q = self.q(query).unflatten(-1, (h, d // h)).transpose(1, 2)  # [B, h, Q, d/h]
        x = F.scaled_dot_product_attention(q, kv[0], kv[1]).transpose(1, 2).flatten(2)  # [B, Q, D]
        x = query + self.proj(x)
        x = x + self.mlp(self.norm_mlp(x))
        return x.mean(1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(tokens))


@dataclass
class AttentiveProbeResult:
    """What :func:`attentive_probe` found.

    Attributes:
        accuracy: Test accuracy of the probe trained on all of train, in [0, 1].
        val_accuracy: Accuracy on the held-out share of train of a probe trained on the rest (NaN if
            ``val_fraction`` is 0): how far the test figure is from what the training data predicts.
        train_accuracy: Accuracy on the training tokens at the end (over-fitting shows as a gap to the test).
        epochs / steps / fit_seconds: What the final fit ran (the validation fit is not counted in ``steps``).
        predictions: ``[N_test]`` predicted labels (in ``train_y``'s label values).
    """

    accuracy: float
    val_accuracy: float
    train_accuracy: float
    epochs: int
    steps: int
    fit_seconds: float
    predictions: np.ndarray | None = None


def _fit_attentive(
    x: torch.Tensor,
    y: torch.Tensor,
    k: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    heads: int,
    queries: int,
    seed: int,
    device: str | torch.device,
) -> tuple[AttentivePooler, int]:
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = AttentivePooler(x.shape[-1], k, heads=heads, queries=queries).to(device)
    decay = [p for p in probe.parameters() if p.ndim >= 2 and p is not probe.query]
    rest = [p for p in probe.parameters() if p.ndim < 2 or p is probe.query]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}])
    per_epoch = math.ceil(len(x) / batch_size)
    total = max(1, epochs * per_epoch)
    warmup = max(1, total // 10)
    step = 0
    probe.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            for group in opt.param_groups:  # linear warm-up over a tenth of the steps, then cosine to 0
                group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
            xb = (x[idx].to(device, torch.float32) - mean) / std
            loss = F.cross_entropy(probe(xb), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return probe.eval(), step


@torch.no_grad()
def _predict(probe: AttentivePooler, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, batch: int = 256):
    dev = mean.device
    return torch.cat(
        [
            probe((x[i : i + batch].to(dev, torch.float32) - mean) / std).argmax(-1).cpu()
            for i in range(0, len(x), batch)
        ]
    )


def attentive_probe(
    train_tokens: torch.Tensor | np.ndarray,
    train_y: np.ndarray,
    test_tokens: torch.Tensor | np.ndarray,
    test_y: np.ndarray,
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    heads: int = 4,
    queries: int = 1,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> AttentiveProbeResult:
    """Train an :class:`AttentivePooler` on frozen tokens ``[N, L, D]`` and score it on the test tokens.

    Tokens are standardised per channel with the training set's statistics (over samples and positions, the
    role of MAE's affine-free BatchNorm in front of its linear probe). AdamW (``weight_decay`` on matrices
    only), linear warm-up over a tenth of the steps, cosine decay to 0, a fixed number of ``epochs``: the
    probe has no early stopping on the test set. With ``val_fraction`` > 0 a first probe is trained on the rest
    of train and scored on the held-out share (``val_accuracy``), then the reported one on all of train.
    """
    t0 = time.perf_counter()
    xtr = torch.as_tensor(train_tokens)
    xte = torch.as_tensor(test_tokens)
    if xtr.ndim != 3 or xte.ndim != 3 or xtr.shape[-1] != xte.shape[-1]:
        raise ValueError(
            f"the attentive probe takes tokens [N, L, D] with the same D on both sides, got train "
            f"{tuple(xtr.shape)} and test {tuple(xte.shape)} (use extract_tokens, not pooled features)"
        )
    if len(xtr) != len(train_y) or len(xte) != len(test_y):
        raise ValueError(
            f"tokens and labels differ in length (train {len(xtr)} vs {len(train_y)}, test {len(xte)} vs {len(test_y)})"
        )
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    classes, ytr, yte = class_indices(train_y, test_y)
    k = len(classes)
    flat = xtr.reshape(-1, xtr.shape[-1]).float()
    mean, std = flat.mean(0).to(device), (flat.std(0) + 1e-6).to(device)
    kw = dict(
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, heads=heads, queries=queries,
        seed=seed, device=device,
    )  # fmt: skip
    val_acc = math.nan
    if val_fraction > 0:
        perm = np.random.default_rng(seed).permutation(len(xtr))
        n_val = max(1, int(len(perm) * val_fraction))
        val_idx, fit_idx = torch.as_tensor(perm[:n_val]), torch.as_tensor(perm[n_val:])
        probe, _ = _fit_attentive(xtr[fit_idx], ytr[fit_idx], k, mean, std, **kw)
        val_acc = float((_predict(probe, xtr[val_idx], mean, std) == ytr[val_idx]).double().mean())
        logger.info("attentive probe: held-out accuracy %.4f", val_acc)
    probe, steps = _fit_attentive(xtr, ytr, k, mean, std, **kw)
    train_acc = float((_predict(probe, xtr, mean, std) == ytr).double().mean())
    pred = _predict(probe, xte, mean, std)
    return AttentiveProbeResult(
        accuracy=float((pred == yte).double().mean()),
        val_accuracy=val_acc,
        train_accuracy=train_acc,
        epochs=epochs,
        steps=steps,
        fit_seconds=time.perf_counter() - t0,
        predictions=classes[pred.numpy()],
    )


# -- fine-tuning -----------------------------------------------------------------------------------
class _Classifier(nn.Module):
    def __init__(self, encoder: ViTEncoder, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE fine-tune head init
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)[:, self.encoder.num_prefix_tokens :].mean(1)  # mean-pooled final-norm patch tokens
        return self.head(feats)


def layer_id(name: str, depth: int) -> int:
    """The layer-decay depth of an encoder parameter: 0 for the embeddings (patch embed, [CLS]), ``i + 1`` for
    block ``i``, ``depth + 1`` for everything above the blocks (final norm, classifier head).

    ``name`` is relative to the encoder (``blocks.3.mlp.fc1.weight``) or carries one leading module name
    (``encoder.blocks.3...``); any name outside the encoder counts as above the blocks.
    """
    parts = name.split(".")
    if parts[0] == "encoder":
        parts = parts[1:]
    if parts[0] in ("patch_embed", "cls_token", "pos_embed"):
        return 0
    if parts[0] == "blocks":
        return int(parts[1]) + 1
    return depth + 1


def layer_decay_param_groups(
    model: nn.Module, depth: int, weight_decay: float, layer_decay: float
) -> list[dict[str, object]]:
    """AdamW parameter groups with MAE / BEiT layer-wise lr decay (arXiv:2111.06377 appendix A.2).

    A parameter at :func:`layer_id` ``l`` gets the learning-rate scale ``layer_decay ** (depth + 1 - l)``: 1 for
    the head and final norm, ``layer_decay`` for the last block, ``layer_decay ** (depth + 1)`` for the patch
    embedding. Weight decay applies to matrices only (not to biases, norms or the [CLS] token), as in MAE.

    Args:
        model: A module whose encoder parameters are named ``encoder.*`` (or the encoder itself).
        depth: The encoder's number of blocks.
        layer_decay: In (0, 1]; 1 gives every group the scale 1 (no decay).

    Returns:
        Groups ``{"params", "weight_decay", "lr_scale", "layer"}`` (empty groups dropped); set each group's lr to
        ``base_lr * lr_scale``.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    groups: dict[tuple[int, bool], dict[str, object]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth)
        decay = p.ndim >= 2 and not name.endswith("cls_token")
        g = groups.setdefault(
            (lid, decay),
            {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (depth + 1 - lid),
                "layer": lid,
            },
        )
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def augment_batch(
    x: torch.Tensor,
    generator: torch.Generator,
    flip: bool = True,
    shift: int = 0,
) -> torch.Tensor:
    """Fine-tune augmentation of images ``[B, C, H, W]`` in [0, 1] -> same shape and range.

    ``flip``: each image is mirrored left-right with probability 1/2. ``shift``: each image is translated by
    independent integer offsets in ``[-shift, shift]`` pixels along both axes, the uncovered border filled with
    0 (Fashion-MNIST's background): pad-and-random-crop, the 28-px stand-in for MAE's random resized crop, whose
    scale range (0.08-1 of the area) would cut most of a 28-px item away.
    """
    b, _, h, w = x.shape
    if flip:
        mirrored = torch.rand(b, generator=generator) < 0.5
        x = torch.where(mirrored[:, None, None, None], x.flip(-1), x)
    if shift > 0:
        padded = F.pad(x, (shift, shift, shift, shift))  # [B, C, H + 2s, W + 2s]
        dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # [B, 1, H, 1]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # [B, 1, 1, W]
        batch = torch.arange(b)[:, None, None, None]
        chans = torch.arange(x.shape[1])[None, :, None, None]
        x = padded[batch, chans, rows, cols]  # [B, C, H, W]
    return x


def with_drop_path(encoder: ViTEncoder, drop_path: float) -> ViTEncoder:
    """A copy of ``encoder`` with stochastic depth ``drop_path`` (the config's field: the rate grows linearly
    from 0 at the first block to ``drop_path`` at the last) and the same weights; active in train mode only."""
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
    new = type(encoder)(dataclasses.replace(encoder.config, drop_path=drop_path))
    new.load_state_dict(encoder.state_dict())
    return new


@torch.no_grad()
def _test_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, in_chans: int) -> tuple[float, float]:
    """Test accuracy of the plain prediction and of the mean logits over the image and its mirror image."""
    model.eval()
    plain = flipped = 0
    for i in range(0, len(images), 512):
        x = to_input(images[i : i + 512], in_chans)
        y = torch.from_numpy(np.array(labels[i : i + 512], dtype=np.int64))
        logits = model(x)
        plain += int((logits.argmax(-1) == y).sum())
        flipped += int(((logits + model(x.flip(-1))).argmax(-1) == y).sum())
    return plain / len(images), flipped / len(images)


def finetune(
    encoder: ViTEncoder,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int = 10,
    epochs: float = 3.0,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    label_smoothing: float = 0.1,
    time_budget_s: float = 600.0,
    seed: int = 0,
    layer_decay: float = 1.0,
    drop_path: float | None = 0.0,
    flip: bool = True,
    shift: int = 0,
    mixup: float = 0.0,
    warmup_frac: float = 0.05,
    ema: float = 0.0,
) -> dict[str, float]:
    """Fine-tune ``encoder`` (in place) + a linear head on mean-pooled final-norm patch tokens.

    MAE's fine-tuning recipe (arXiv:2111.06377 appendix A.2, ViT-B: 100 epochs, AdamW, lr 2e-3 at batch 1024
    with warm-up and cosine decay, layer decay 0.65-0.75, drop path 0.1, label smoothing 0.1, RandAug, mixup
    0.8, cutmix 1.0, random resized crop) cut down to a 6-block ViT on 28-px Fashion-MNIST for a few epochs
    on a CPU. Every part is an option; the defaults are what measured best at this budget (README, "Masked image
    modeling": 20-epoch MAE, 600 s = 3.1 epochs of fine-tuning on 1 CPU thread): the MAE-faithful setting
    ``layer_decay=0.75, drop_path=0.1, shift=2`` gave 0.876 test accuracy against 0.900 for these defaults, and
    its training accuracy (0.865 vs 0.918) shows why: a 3-epoch run underfits, so every brake on fitting costs.

    - ``lr`` 1e-3 at batch 128 (AdamW, betas 0.9 / 0.999, ``weight_decay`` 0.05 on matrices only).
    - ``layer_decay`` 1.0 (off). Below 1, block ``i`` of ``depth`` learns at ``layer_decay ** (depth - i)`` of
      ``lr`` and the patch embedding at ``layer_decay ** (depth + 1)`` (0.75 -> 0.13 for 6 blocks, about the
      spread MAE's 0.65-0.75 gives a 12-24 block ViT-B/L), so pretrained lower layers move less than the head.
    - ``drop_path`` 0.0 (MAE uses 0.1, linear from 0 at block 0 to the value at the last), set through the
      encoder config's ``drop_path`` field on a copy, so it is active in training only. ``None`` keeps the
      encoder's own.
    - ``flip`` on, ``shift`` 0: mirror images; ``shift`` > 0 also translates them by up to that many pixels
      (pad and random crop), the 28-px stand-in for random resized crop (see :func:`augment_batch`). RandAug
      is left out.
    - ``label_smoothing`` 0.1 (MAE's). ``mixup`` 0 (off): mixing two images per sample, with the loss mixed by
      the same Beta(``mixup``, ``mixup``) weight, regularises 100-epoch runs and slows a short one.
    - Warm-up over ``warmup_frac`` of the planned steps, then cosine decay to 0, where progress is the larger
      of step / planned steps (``epochs``) and elapsed / ``time_budget_s``, so a time-limited run still
      anneals fully.
    - ``ema`` 0 (off). Above 0, an exponential moving average of the weights (``torch.optim.swa_utils``,
      decay ``ema`` per step, buffers included) is kept beside them and scored too (``accuracy_ema``); the
      returned encoder keeps the live weights. DeiT-style fine-tunes keep one; here (30 minutes, cosine to 0,
      decay 0.998) it moved test accuracy by +-0.001 (README, "Masked image modeling").

    With these defaults the loop is the one from before the options existed (only the head's initial draw is
    now seeded).

    Returns:
        ``accuracy`` (test, in [0, 1]), ``accuracy_flip_tta`` (logits averaged over each test image and its
        mirror image), ``train_accuracy`` (on the augmented training batches of the last 10% of steps),
        ``steps``, ``planned_steps``, ``seconds``, ``epochs_done`` and the recipe's settings.
    """
    if mixup < 0:
        raise ValueError(f"mixup must be >= 0 (0 = off), got {mixup}")
    if not 0 <= ema < 1:
        raise ValueError(f"ema is a per-step decay in [0, 1) (0 = off), got {ema}")
    if drop_path is not None and drop_path != encoder.config.drop_path:
        model_encoder = with_drop_path(encoder, drop_path)
    else:
        model_encoder = encoder
    g = torch.Generator().manual_seed(seed)
    # the head's init and drop path's draws use the global generator: seed it without disturbing the caller's
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _Classifier(model_encoder, num_classes).train()
        xs = torch.from_numpy(np.array(train_images, copy=True))
        ys = torch.from_numpy(np.array(train_labels, copy=True)).long()
        steps_per_epoch = math.ceil(len(xs) / batch_size)
        total = max(1, int(epochs * steps_per_epoch))
        warmup = max(1, int(total * warmup_frac))
        depth = len(model_encoder.blocks)
        opt = torch.optim.AdamW(
            layer_decay_param_groups(model, depth, weight_decay, layer_decay), lr=lr, betas=(0.9, 0.999)
        )
        beta = torch.distributions.Beta(mixup, mixup) if mixup > 0 else None
        averaged = None
        if ema > 0:
            averaged = swa_utils.AveragedModel(
                model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(ema), use_buffers=True
            )
        ce = functools.partial(F.cross_entropy, label_smoothing=label_smoothing)
        in_chans = model_encoder.config.in_chans
        # (correct, seen) per step for the late training accuracy; counts stay tensors (no host read per step)
        hits: list[tuple[torch.Tensor, int]] = []
        t0 = time.perf_counter()
        step = 0
        while step < total and time.perf_counter() - t0 < time_budget_s:
            perm = torch.randperm(len(xs), generator=g)
            for i in range(0, len(perm), batch_size):
                if step >= total or time.perf_counter() - t0 >= time_budget_s:
                    break
                idx = perm[i : i + batch_size]
                x = augment_batch(to_input(xs[idx], in_chans), g, flip=flip, shift=shift)
                y = ys[idx]
                # the schedule follows whichever runs out first, steps or time, so it always anneals to 0
                progress = max(step / total, (time.perf_counter() - t0) / time_budget_s)
                scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
                for group in opt.param_groups:
                    group["lr"] = lr * scale * group["lr_scale"]
                if beta is not None:  # mixup: one Beta draw per batch, each image paired with a shuffled partner
                    lam = float(beta.sample())
                    partner = torch.randperm(len(idx), generator=g)
                    logits = model(lam * x + (1 - lam) * x[partner])
                    loss = lam * ce(logits, y) + (1 - lam) * ce(logits, y[partner])
                else:
                    logits = model(x)
                    loss = ce(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if averaged is not None:
                    averaged.update_parameters(model)
                hits.append(((logits.detach().argmax(-1) == y).sum(), len(idx)))
                step += 1
    seconds = time.perf_counter() - t0
    accuracy, accuracy_tta = _test_accuracy(model, test_images, test_labels, in_chans)
    scores = {"accuracy": accuracy, "accuracy_flip_tta": accuracy_tta}
    if averaged is not None:
        scores["accuracy_ema"], scores["accuracy_ema_flip_tta"] = _test_accuracy(
            averaged.module, test_images, test_labels, in_chans
        )
    if model_encoder is not encoder:  # the caller's encoder holds the fine-tuned weights, as it always did
        encoder.load_state_dict(model_encoder.state_dict())
    late = hits[-max(1, len(hits) // 10) :]
    return {
        **scores,
        "train_accuracy": float(sum(int(c) for c, _ in late)) / max(1, sum(n for _, n in late)),
        "steps": step,
        "planned_steps": total,
        "seconds": seconds,
        "epochs_done": step / steps_per_epoch,
        "lr": lr,
        "batch_size": batch_size,
        "layer_decay": layer_decay,
        "drop_path": model_encoder.config.drop_path,
        "flip": flip,
        "shift": shift,
        "mixup": mixup,
        "label_smoothing": label_smoothing,
        "ema": ema,
    }


def add_finetune_args(p: argparse.ArgumentParser, help_prefix: str = "") -> None:
    """Add the ``--finetune-*`` options of :func:`finetune` to ``p`` (one definition for ``mmtok eval mim`` and
    ``tools/bench/mim.py``); :func:`finetune_kwargs` turns the parsed namespace back into keyword arguments."""
    h = help_prefix
    p.add_argument("--finetune-budget", type=float, default=600.0, help=f"{h}fine-tune seconds")
    p.add_argument(
        "--finetune-epochs",
        type=float,
        default=6.0,
        help=f"{h}planned fine-tune epochs (the cosine spans these or --finetune-budget, whichever ends first)",
    )
    p.add_argument("--finetune-lr", type=float, default=1e-3, help=f"{h}fine-tune lr of the head (AdamW)")
    p.add_argument("--finetune-batch", type=int, default=128)
    p.add_argument(
        "--finetune-layer-decay",
        type=float,
        default=1.0,
        help=f"{h}layer-wise lr decay (block i of d learns at decay**(d-i) of the lr; 1 = off; MAE: 0.75)",
    )
    p.add_argument(
        "--finetune-drop-path",
        type=float,
        default=0.0,
        help=f"{h}stochastic depth of the last block while fine-tuning (linear from 0; MAE: 0.1)",
    )
    p.add_argument(
        "--finetune-shift",
        type=int,
        default=0,
        help=f"{h}random translation of fine-tune images by up to this many pixels (0 = off)",
    )
    p.add_argument("--finetune-no-flip", action="store_true", help=f"{h}no random mirror images in fine-tuning")
    p.add_argument("--finetune-mixup", type=float, default=0.0, help=f"{h}mixup Beta parameter (0 = off)")
    p.add_argument("--finetune-label-smoothing", type=float, default=0.1)
    p.add_argument(
        "--finetune-ema",
        type=float,
        default=0.0,
        help=f"{h}also score an exponential moving average of the weights with this per-step decay (0 = off)",
    )
    p.add_argument("--finetune-seed", type=int, default=0)


def finetune_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`finetune` from options added by :func:`add_finetune_args`."""
    return {
        "epochs": args.finetune_epochs,
        "time_budget_s": args.finetune_budget,
        "lr": args.finetune_lr,
        "batch_size": args.finetune_batch,
        "layer_decay": args.finetune_layer_decay,
        "drop_path": args.finetune_drop_path,
        "flip": not args.finetune_no_flip,
        "shift": args.finetune_shift,
        "mixup": args.finetune_mixup,
        "label_smoothing": args.finetune_label_smoothing,
        "ema": args.finetune_ema,
        "seed": args.finetune_seed,
    }

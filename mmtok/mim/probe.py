"""Evaluating a masked-modeling encoder: frozen-feature linear probe and a short fine-tune.

The linear probe follows MAE's protocol in spirit (arXiv:2111.06377, sec. 4: features of the frozen
encoder, a linear classifier) but uses scikit-learn's multinomial logistic regression on standardised
features, with the inverse regularisation ``C`` chosen on a held-out part of the training set and the
classifier refit on the whole training set. The fine-tune trains the whole encoder plus a linear head
on mean-pooled final-norm features with AdamW, warm-up and cosine decay, under a wall-clock budget.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmtok.mim.vit import ViTEncoder

logger = logging.getLogger(__name__)

__all__ = ["ProbeResult", "extract_features", "finetune", "linear_probe", "to_input"]


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


@dataclass
class ProbeResult:
    accuracy: float  # on the test set
    C: float  # chosen inverse regularisation
    val_accuracy: float  # of the chosen C on the held-out part of train
    fit_seconds: float


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    Cs: tuple[float, ...] = (0.01, 0.1, 1.0),
    val_fraction: float = 0.1,
    tune_subset: int = 20000,
    max_iter: int = 300,
    seed: int = 0,
) -> ProbeResult:
    """Standardise, tune C on a held-out split of train (on at most ``tune_subset`` samples), refit, test.

    Args:
        train_x / test_x: ``[N, F]`` features. train_y / test_y: ``[N]`` int labels.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("features and labels differ in length")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(train_x))
    n_val = max(1, int(len(perm) * val_fraction))
    val_idx, fit_idx = perm[:n_val], perm[n_val:][:tune_subset]
    scaler = StandardScaler().fit(train_x)
    tx, vx = scaler.transform(train_x), scaler.transform(test_x)
    best = (-1.0, Cs[0])
    for c in Cs:
        clf = _fit_quietly(LogisticRegression(C=c, max_iter=max_iter), tx[fit_idx], train_y[fit_idx])
        acc = float(clf.score(tx[val_idx], train_y[val_idx]))
        logger.info("probe C=%g: held-out accuracy %.4f", c, acc)
        if acc > best[0]:
            best = (acc, c)
    if len(Cs) > 1 and best[1] in (min(Cs), max(Cs)):
        logger.warning(
            "probe: the best C=%g is at the edge of the grid %s; the optimum may lie outside it", best[1], Cs
        )
    clf = _fit_quietly(LogisticRegression(C=best[1], max_iter=max_iter), tx, train_y)
    return ProbeResult(float(clf.score(vx, test_y)), best[1], best[0], time.perf_counter() - t0)


def _fit_quietly(clf, x: np.ndarray, y: np.ndarray):
    """Fit without scikit-learn's per-call ConvergenceWarning (it prints absolute paths); say it once, in a log line."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    if int(np.max(clf.n_iter_)) >= clf.max_iter:
        logger.warning(
            "probe (C=%g) stopped at max_iter=%d before converging: its accuracy is a lower bound", clf.C, clf.max_iter
        )
    return clf


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
) -> dict[str, float]:
    """Fine-tune ``encoder`` (in place) + a linear head; returns test accuracy, steps and seconds.

    The cosine schedule spans ``epochs`` or ``time_budget_s``, whichever ends first (progress is the
    larger of step / planned steps and elapsed / budget), so a time-limited run still anneals fully.
    """
    g = torch.Generator().manual_seed(seed)
    model = _Classifier(encoder, num_classes).train()
    xs = torch.from_numpy(np.array(train_images, copy=True))
    ys = torch.from_numpy(np.array(train_labels, copy=True)).long()
    steps_per_epoch = math.ceil(len(xs) / batch_size)
    total = max(1, int(epochs * steps_per_epoch))
    warmup = max(1, total // 20)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.endswith("cls_token")]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not n.endswith("cls_token"))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.999),
    )
    t0 = time.perf_counter()
    step = 0
    while step < total and time.perf_counter() - t0 < time_budget_s:
        perm = torch.randperm(len(xs), generator=g)
        for i in range(0, len(perm), batch_size):
            if step >= total or time.perf_counter() - t0 >= time_budget_s:
                break
            idx = perm[i : i + batch_size]
            x = to_input(xs[idx], encoder.config.in_chans)
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            # the schedule follows whichever runs out first, steps or time, so it always anneals to 0
            progress = max(step / total, (time.perf_counter() - t0) / time_budget_s)
            scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            for group in opt.param_groups:
                group["lr"] = lr * scale
            loss = F.cross_entropy(model(x), ys[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
    seconds = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test_images), 512):
            x = to_input(test_images[i : i + 512], encoder.config.in_chans)
            pred = model(x).argmax(-1).numpy()
            correct += int((pred == np.asarray(test_labels[i : i + 512])).sum())
    return {
        "accuracy": correct / len(test_images),
        "steps": step,
        "planned_steps": total,
        "seconds": seconds,
        "epochs_done": step / steps_per_epoch,
    }

"""Quantizers: a thin adapter over vector-quantize-pytorch (VQ, residual VQ, FSQ) behind one interface.

Papers: VQ-VAE (arXiv:1711.00937) with EMA codebook updates; k-means codebook init and dead-code
replacement (Jukebox / SoundStream, arXiv:2107.03312); low-dimensional, l2-normalised codes (ViT-VQGAN,
arXiv:2110.04627; LlamaGen, arXiv:2406.06525); residual VQ (SoundStream); FSQ (arXiv:2309.15505);
rotation trick (arXiv:2410.06424). Reference implementation: lucidrains/vector-quantize-pytorch.

What mmtok adds on top of the library:

* The library version is pinned (``1.32.0``, see pyproject) and every default that moved between its
  releases (EMA decay, rotation trick, dead-code threshold) is passed explicitly from our config.
* Quantization always runs in fp32, even under bf16 autocast (bf16 nearest-code search picks wrong
  codes and EMA updates lose precision).
* Codebook health is always measured, with one definition (:func:`codebook_stats`) in training logs,
  in the in-training evaluation and in ``mmtok eval tokenizer``: over the last ``usage_window``
  assignments (65,536 by default, LlamaGen's window; all of them when there are fewer),
  ``usage`` = distinct codes / codebook size (LlamaGen's metric), ``usage_ge4`` = share of codes
  assigned at least ``ACTIVE_MIN_HITS`` = 4 times, and ``perplexity`` = exp(H(p)) of the code frequencies;
  residual VQ reports the mean over levels. ``usage`` alone flatters: a code hit once counts as used,
  so right after k-means init (every code is the mean of a cluster of the first batch, so nearly every
  code is hit at once) it is ~100% by construction; ``usage_ge4`` does not have that blind spot. Why 4:
  with the default window and a 1,024-code book a uniformly used code gets 64 hits, so 4 separates "in
  use" from "touched by chance"; for books of 16k codes and more (about 4 hits per code at uniform use)
  read it with care.
  Counting every assignment instead (as a plain bincount over an evaluation set does) makes usage grow
  with the number of evaluated images, so evaluation uses the same window.
* Dead-code restart in the library's own units, spelled out. ``threshold_ema_dead_code`` is compared
  with a code's EMA cluster size, the exponential average (weight ``1 - decay``) of its hits *per
  training step*; a code below it is moved onto a random vector of the current batch and its cluster
  size set to ``reset_cluster_size``. Three consequences the library leaves implicit:
  (1) the threshold means something only next to the uniform rate ``tokens per step / codebook_size``
  (batch 16 of 16x16 grids into 1,024 codes: 4 hits per code and step; threshold 2 = half of uniform),
  so it must move with the batch; (2) a code that stops being hit is found only after
  ``ln(size / threshold) / -ln(decay)`` steps: about 70 steps from the uniform 4 down to 2 at decay
  0.99, so in a 170-step CPU budget dead codes sit undetected for most of the run (k-means init counts
  the first batch's cluster sizes, all about 4); (3) the library restarts a code *at* the threshold
  (``reset_cluster_size`` defaults to it), so a restarted code that gets fewer hits than the threshold in
  its first step drops below it and is replaced again at once: it never gets time to win a region.
  ``reset_cluster_size`` (ours, 0 = the library's choice) gives a restarted code a start above the
  threshold; it must not be below it. The first training forward logs the uniform rate next to the
  threshold and warns when the threshold is at or above it (every code would be restarted).
* Outside training the nearest-code search is ours and chunked (:func:`nearest_code`): it never
  materialises more than ``search_chunk_bytes`` of distances (the library builds the full N x K matrix,
  ~1 GB for 16k codes and a batch of 16k vectors). Training keeps the library's path, which needs the
  one-hot assignments for its EMA update anyway.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from importlib import metadata

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mmtok.registries import QUANTIZERS

logger = logging.getLogger(__name__)

VQ_LIBRARY_VERSION = "1.32.0"
try:
    _found = metadata.version("vector-quantize-pytorch")
    if _found != VQ_LIBRARY_VERSION:
        logger.warning(
            "vector-quantize-pytorch %s is installed but mmtok is tested with %s; defaults may differ",
            _found,
            VQ_LIBRARY_VERSION,
        )
except metadata.PackageNotFoundError:  # pragma: no cover - it is a hard dependency
    pass

from vector_quantize_pytorch import FSQ, ResidualVQ, VectorQuantize  # noqa: E402


@dataclass
class QuantizerConfig:
    """Shared config of every quantizer (fields a kind does not use are ignored by it)."""

    dim: int = 32  # width of the vectors to quantize
    codebook_size: int = 1024  # VQ / RVQ codes per codebook
    codebook_dim: int = 0  # low-dim codes: project dim -> codebook_dim before lookup (0 = dim)
    use_cosine_sim: bool = False  # l2-normalised inputs and codes
    decay: float = 0.99  # EMA decay of the codebook
    kmeans_init: bool = True  # init codes by k-means on the first batch
    kmeans_iters: int = 10
    threshold_ema_dead_code: float = 2.0  # replace codes whose EMA hits per step drop below (0 = off)
    reset_cluster_size: float = 0.0  # EMA hits per step a restarted code starts from (0 = the threshold)
    commitment_weight: float = 0.25
    rotation_trick: bool = True  # gradient estimator through the quantizer (False = straight-through)
    num_quantizers: int = 4  # residual VQ depth
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # FSQ levels per channel
    usage_window: int = 65536  # assignments kept for the usage / perplexity statistics (USAGE_WINDOW)
    search_chunk_bytes: int = 64 << 20  # max distance-matrix bytes per chunk at inference


@dataclass
class QuantizerOutput:
    """Result of quantizing ``[B, N, D]`` vectors.

    Attributes:
        quantized: ``[B, N, D]`` fp32 quantized vectors (gradients reach the input in training).
        indices: ``[B, N]`` long code ids (``[B, N, Q]`` for residual VQ).
        loss: Scalar auxiliary loss (commitment), already weighted; zero outside training.
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor


def nearest_code(x: Tensor, codebook: Tensor, cosine: bool = False, chunk_bytes: int = 64 << 20) -> Tensor:
    """Index of the nearest code for every row of ``x``, computed in row chunks.

    Args:
        x: ``[N, d]`` vectors (l2-normalised already when ``cosine``).
        codebook: ``[K, d]`` codes.
        cosine: Maximise the dot product instead of minimising the Euclidean distance.
        chunk_bytes: Upper bound on the size of one ``[chunk, K]`` distance block.

    Returns:
        ``[N]`` long indices.
    """
    n, k = x.shape[0], codebook.shape[0]
    rows = max(1, chunk_bytes // (4 * k))
    out = torch.empty(n, dtype=torch.long, device=x.device)
    sq = None if cosine else codebook.pow(2).sum(-1)  # [K]
    for i in range(0, n, rows):
        xi = x[i : i + rows]
        sim = xi @ codebook.t()  # [rows, K]
        if not cosine:
            # argmin ||x - e||^2 = argmax (2 x.e - ||e||^2); ||x||^2 is constant per row
            sim = sim.mul_(2).sub_(sq)
        out[i : i + rows] = sim.argmax(-1)
    return out


USAGE_WINDOW = 65536  # assignments the usage statistics look at (LlamaGen's window)
ACTIVE_MIN_HITS = 4  # hits within the window for a code to count in ``usage_ge4``


def codebook_stats(
    indices: Tensor, codebook_size: int, *, levels: int = 1, window: int = USAGE_WINDOW
) -> dict[str, float]:
    """Codebook health over the last ``window`` assignments (the one definition used everywhere).

    Args:
        indices: Code ids in the order they were assigned (batch-major, then raster / sequence order);
            any shape, flattened; with ``levels > 1`` the last axis holds the residual levels
            (``[..., Q]``). Negative ids are empty slots and are ignored.
        codebook_size: K, codes per codebook.
        levels: Residual levels Q (each has its own book; the statistics are averaged over levels).
        window: Only the last ``window`` valid assignments of each level count.

    Returns:
        ``usage``: distinct codes / K in [0, 1]; ``usage_ge4``: share of codes with at least
        ``ACTIVE_MIN_HITS`` hits, in [0, 1]; ``perplexity``: exp(H) of the code frequencies in
        [1, K] (0 when there is no assignment); ``assignments``: assignments counted per level.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 assignment, got {window}")
    per_level = indices.reshape(-1, levels)  # [M, Q]
    keys = ("usage", "usage_ge4", "perplexity", "assignments")
    sums = dict.fromkeys(keys, 0.0)
    for q in range(levels):
        flat = per_level[:, q]
        flat = flat[flat >= 0][-window:]  # the most recent assignments of this level
        if flat.numel() == 0:
            continue
        counts = torch.bincount(flat.long(), minlength=codebook_size).double()
        p = counts / counts.sum()
        ent = -(p[p > 0] * p[p > 0].log()).sum()
        sums["usage"] += float((counts > 0).sum()) / codebook_size
        sums["usage_ge4"] += float((counts >= ACTIVE_MIN_HITS).sum()) / codebook_size
        sums["perplexity"] += float(ent.exp())
        sums["assignments"] += flat.numel()
    return {k: v / levels for k, v in sums.items()}


class Quantizer(nn.Module):
    """Common interface: ``forward(x [B, N, D]) -> QuantizerOutput``, ``indices_to_latents(ids)``.

    Keeps a ring buffer of the last ``usage_window`` assignments (per level for residual VQ) seen in
    training, from which :meth:`stats` reports :func:`codebook_stats` (usage, usage_ge4, perplexity).
    """

    codebook_size: int
    levels_per_token: int = 1  # codes per vector (residual VQ: num_quantizers)

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.config = config
        window = max(1, config.usage_window)
        # not persistent: statistics, not weights (a saved model stays identical to a fresh load)
        self.register_buffer("_recent", torch.full((window, self.levels_per_token), -1, dtype=torch.long), False)
        self.register_buffer("_ptr", torch.zeros((), dtype=torch.long), False)

    def _quantize(self, x: Tensor) -> QuantizerOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def indices_to_latents(self, indices: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Code ids ``[B, N]`` (``[B, N, Q]``) -> quantized vectors ``[B, N, D]``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> QuantizerOutput:
        """Quantize ``x`` ``[B, N, D]`` in fp32 whatever the autocast state."""
        if x.ndim != 3 or x.shape[-1] != self.config.dim:
            raise ValueError(f"quantizer expects [B, N, {self.config.dim}] vectors, got {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self._quantize(x.float())
        if self.training:
            self._record(out.indices)
        return out

    @torch.no_grad()
    def _record(self, indices: Tensor) -> None:
        ids = indices.reshape(-1, self.levels_per_token)
        w = self._recent.shape[0]
        ids = ids[-w:]
        n = ids.shape[0]
        pos = (self._ptr + torch.arange(n, device=ids.device)) % w
        self._recent[pos] = ids.to(self._recent.device)
        self._ptr.copy_((self._ptr + n) % w)

    def stats(self) -> dict[str, float]:
        """:func:`codebook_stats` of the recent training assignments (mean over residual levels).

        The buffer holds exactly the last ``usage_window`` assignments (slot order does not matter for
        counts); empty slots (-1) before the window first fills are ignored.
        """
        return codebook_stats(self._recent, self.codebook_size, levels=self.levels_per_token, window=len(self._recent))

    def reset_stats(self) -> None:
        self._recent.fill_(-1)
        self._ptr.zero_()


def _vq_kwargs(c: QuantizerConfig) -> dict:
    """Every library default that matters, spelled out (they move between releases)."""
    return dict(
        codebook_dim=c.codebook_dim or None,
        use_cosine_sim=c.use_cosine_sim,
        decay=c.decay,
        kmeans_init=c.kmeans_init,
        kmeans_iters=c.kmeans_iters,
        threshold_ema_dead_code=c.threshold_ema_dead_code,
        commitment_weight=c.commitment_weight,
        rotation_trick=c.rotation_trick,
        straight_through=False,
        ema_update=True,
        learnable_codebook=False,
        stochastic_sample_codes=False,
        orthogonal_reg_weight=0.0,
        codebook_diversity_loss_weight=0.0,
    )


def _configure_restart(layer: VectorQuantize, c: QuantizerConfig) -> None:
    """Set the restart size of one library VQ layer (its constructor does not take it)."""
    if c.reset_cluster_size < 0:
        raise ValueError(f"reset_cluster_size must be >= 0 (0 = the threshold), got {c.reset_cluster_size}")
    if c.threshold_ema_dead_code > 0 and 0 < c.reset_cluster_size < c.threshold_ema_dead_code:
        raise ValueError(
            f"reset_cluster_size {c.reset_cluster_size} is below threshold_ema_dead_code "
            f"{c.threshold_ema_dead_code}: every restarted code would be replaced again the next step; "
            "use a value >= the threshold (or 0 for the threshold itself)"
        )
    if c.reset_cluster_size > 0:
        layer._codebook.reset_cluster_size = float(c.reset_cluster_size)


def _check_restart_rate(c: QuantizerConfig, tokens: int, layer: VectorQuantize) -> None:
    """Log the uniform hits per code and step next to the dead-code threshold (once per quantizer).

    ``tokens`` are this process's vectors per step; a codebook synced across ranks sums the counts of
    every rank (the library all-reduces them), so the rate is then per step of the whole job.
    """
    if c.threshold_ema_dead_code <= 0:
        return
    if layer._codebook.use_ddp and torch.distributed.is_initialized():
        tokens *= torch.distributed.get_world_size()
    uniform = tokens / c.codebook_size
    logger.info(
        "dead-code restart: %d vectors per step into %d codes = %.2f hits per code at uniform use; threshold %.2f, "
        "restart size %.2f, decay %.3f",
        tokens,
        c.codebook_size,
        uniform,
        c.threshold_ema_dead_code,
        c.reset_cluster_size or c.threshold_ema_dead_code,
        c.decay,
    )
    if c.threshold_ema_dead_code >= uniform:
        logger.warning(
            "threshold_ema_dead_code %.2f >= %.2f hits per code and step at uniform use (batch x tokens / codebook "
            "size): most codes will be restarted every step; lower the threshold or raise the batch",
            c.threshold_ema_dead_code,
            uniform,
        )


def _search(vq: VectorQuantize, x: Tensor, chunk_bytes: int) -> tuple[Tensor, Tensor]:
    """Inference path of one library VQ layer: (indices [B, N], quantized [B, N, D]) without N x K matrices."""
    z = vq.project_in(x)
    if vq.use_cosine_sim:
        z = F.normalize(z, dim=-1)
    b = z.shape[0]
    ids = nearest_code(rearrange(z, "b n d -> (b n) d"), vq.codebook, vq.use_cosine_sim, chunk_bytes)
    ids = rearrange(ids, "(b n) -> b n", b=b)
    return ids, vq.get_output_from_indices(ids)


@QUANTIZERS.register("vq", config=QuantizerConfig, help="VQ: EMA codebook, k-means init, dead-code restart")
class VQ(Quantizer):
    """Single-codebook VQ (optionally l2-normalised and/or low-dimensional codes)."""

    def __init__(self, config: QuantizerConfig):
        super().__init__(config)
        self.codebook_size = config.codebook_size
        self.vq = VectorQuantize(dim=config.dim, codebook_size=config.codebook_size, **_vq_kwargs(config))
        _configure_restart(self.vq, config)
        self._rate_logged = False

    def _quantize(self, x: Tensor) -> QuantizerOutput:
        if self.training:
            if not self._rate_logged:
                _check_restart_rate(self.config, x.shape[0] * x.shape[1], self.vq)
                self._rate_logged = True
            q, ids, loss = self.vq(x)
            return QuantizerOutput(q, ids, loss.reshape(()))
        ids, q = _search(self.vq, x, self.config.search_chunk_bytes)
        return QuantizerOutput(q, ids, x.new_zeros(()))

    def indices_to_latents(self, indices: Tensor) -> Tensor:
        return self.vq.get_output_from_indices(indices.long())


@QUANTIZERS.register("rvq", config=QuantizerConfig, help="residual VQ (num_quantizers levels)")
class RVQ(Quantizer):
    """Residual VQ: each level quantizes what the previous levels left; codes are summed."""

    def __init__(self, config: QuantizerConfig):
        self.levels_per_token = config.num_quantizers
        super().__init__(config)
        self.codebook_size = config.codebook_size
        self.rvq = ResidualVQ(
            dim=config.dim,
            num_quantizers=config.num_quantizers,
            codebook_size=config.codebook_size,
            quantize_dropout=False,
            **_vq_kwargs(config),
        )
        for layer in self.rvq.layers:
            _configure_restart(layer, config)
        self._rate_logged = False

    def _quantize(self, x: Tensor) -> QuantizerOutput:
        if self.training:
            if not self._rate_logged:
                _check_restart_rate(self.config, x.shape[0] * x.shape[1], self.rvq.layers[0])
                self._rate_logged = True
            q, ids, losses = self.rvq(x)
            return QuantizerOutput(q, ids, losses.sum())
        z = self.rvq.project_in(x)
        residual, total, all_ids = z, torch.zeros_like(z), []
        for layer in self.rvq.layers:
            ids, q = _search(layer, residual, self.config.search_chunk_bytes)
            residual = residual - q
            total = total + q
            all_ids.append(ids)
        return QuantizerOutput(self.rvq.project_out(total), torch.stack(all_ids, -1), x.new_zeros(()))

    def indices_to_latents(self, indices: Tensor) -> Tensor:
        return self.rvq.get_output_from_indices(indices.long())


@QUANTIZERS.register("fsq", config=QuantizerConfig, help="FSQ: finite scalar quantization (no codebook to collapse)")
class FSQuantizer(Quantizer):
    """Finite scalar quantization; codebook size = prod(levels)."""

    def __init__(self, config: QuantizerConfig):
        super().__init__(config)
        if not config.levels or min(config.levels) < 3:
            raise ValueError(f"FSQ levels must be >= 3 each (got {config.levels}); e.g. [8, 5, 5, 5]")
        self.codebook_size = math.prod(config.levels)
        self.fsq = FSQ(levels=list(config.levels), dim=config.dim)

    def _quantize(self, x: Tensor) -> QuantizerOutput:
        q, ids = self.fsq(x)
        return QuantizerOutput(q, ids.long(), x.new_zeros(()))

    def indices_to_latents(self, indices: Tensor) -> Tensor:
        return self.fsq.indices_to_codes(indices.long())

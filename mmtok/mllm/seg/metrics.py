"""Segmentation metrics of referring and semantic segmentation: IoU, gIoU, cIoU, mIoU, repair rate.

Definitions follow the referring-segmentation literature (LISA, arXiv:2308.00692; Text4Seg,
arXiv:2410.09855; their evaluation scripts, e.g. github.com/mc-lan/Text4Seg ``eval_refer_seg.py``):

* ``gIoU``: the mean over samples of each sample's foreground IoU. A sample whose ground truth and
  prediction are both empty scores 1.0 (Text4Seg adds 1.0 where the union is 0); an empty ground truth with a
  non-empty prediction scores 0.0.
* ``cIoU``: cumulative IoU, total intersection over total union across the set (large objects weigh more).
* ``mIoU`` (semantic label masks): per-class intersection and union summed over the set, IoU per class, then
  the mean over the foreground classes (ids >= 1) that occur in the ground truth or the prediction of at least
  one sample. Background (id 0) is left out by default (``include_background=True`` adds it), since it
  dominates a scene of a few small items and would hide the classes that matter.

What mmtok adds: a grounding rate for scenes with an instance map (:func:`picks_referred`: does the mask cover
the referred instance more than any other? It tells a head that draws good masks of the wrong object, or of every
object, from one that draws poor masks), the parse-repair rate of text-as-mask decoders (fraction of samples
whose text needed at least one repair, and the mean number of repairs), and optional per-sample token counts and
latencies so one meter carries everything ``mmtok eval seg`` reports.

No-target samples (GRES, Liu et al., CVPR 2023, arXiv:2306.00968; reference code henghuiding/ReLA): a sample whose
ground truth is empty (the expression names nothing in the image) is a no-target sample. ``N-acc`` is the share of
no-target samples predicted empty, ``T-acc`` the share of with-target samples predicted non-empty (GRES's TP/(TP+FN)
and TN/(TN+FP) with "no target" as the positive class). ReLA decides "no target" with a separate classifier; mmtok's
heads have none, so "predicted empty" means the mask has no foreground pixel. gIoU already scores an empty
prediction on an empty ground truth as 1.0 (GRES's rule); cIoU gains nothing from a correct empty answer and loses
the whole false mask from a wrong one. Pure numpy; no epsilon in the ratios
(exact 0/0 rules instead), so hand-computed values compare exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _binary(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    return mask if mask.dtype == bool else mask > 0


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Foreground IoU of two masks ``[H, W]`` (bool, or label ids where > 0 is foreground).

    Returns:
        ``|pred & gt| / |pred | gt|`` in [0, 1]; 1.0 when both are empty.
    """
    p, g = _binary(pred), _binary(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ; resize the prediction first")
    union = int(np.count_nonzero(p | g))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(p & g)) / union


def picks_referred(pred: np.ndarray, instances: np.ndarray, target: int) -> bool | None:
    """Does ``pred`` cover instance ``target`` (a larger share of its pixels) more than any other instance?

    Args:
        pred: ``[H, W]`` predicted mask (bool or label ids, > 0 = foreground).
        instances: ``[H, W]`` int instance map, 0 = background, ``i`` = instance ``i``.
        target: The referred instance id (>= 1).

    Returns:
        True / False, or None when the scene has fewer than two instances (nothing to choose between).
    """
    p = _binary(pred)
    ids = [int(i) for i in np.unique(instances) if i > 0]
    if target not in ids or len(ids) < 2:
        return None
    cover = {i: np.count_nonzero(p & (instances == i)) / np.count_nonzero(instances == i) for i in ids}
    return bool(cover[target] > max(v for i, v in cover.items() if i != target))


@dataclass
class SegMeter:
    """Accumulates per-sample results; :meth:`summary` gives the set's metrics.

    Args:
        include_background: count class 0 in mIoU.
    """

    include_background: bool = False
    ious: list[float] = field(default_factory=list)  # per-sample foreground IoU, in update order
    repairs: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    inter: int = 0
    union: int = 0
    class_inter: dict[int, int] = field(default_factory=dict)
    class_union: dict[int, int] = field(default_factory=dict)
    # no-target bookkeeping (GRES): counts, so meters merge by addition
    no_target: int = 0  # samples without a target
    no_target_empty: int = 0  # ... predicted empty (N-acc's numerator)
    with_target: int = 0  # samples with a target
    with_target_found: int = 0  # ... predicted non-empty (T-acc's numerator)

    def update(
        self,
        pred: np.ndarray,
        gt: np.ndarray,
        repairs: int = 0,
        tokens: int | None = None,
        seconds: float | None = None,
        no_target: bool | None = None,
    ) -> float:
        """Add one sample.

        Args:
            pred: ``[H, W]`` predicted mask: bool (referring) or int label ids (semantic; 0 = background).
            gt: ``[H, W]`` ground truth, same convention and shape.
            repairs: repairs the decoder made for this sample's text (0 for heads without text).
            tokens: generated mask tokens (descriptor length), if known.
            seconds: time to the mask, if measured.
            no_target: whether the expression names nothing in the image (a shard's ``json.no_target``); None =
                decide from the ground truth (empty = no target). A no-target sample must have an empty ground
                truth.

        Returns:
            This sample's foreground IoU.
        """
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ; resize the prediction")
        p, g = _binary(pred), _binary(gt)
        inter, union = int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g))
        iou = 1.0 if union == 0 else inter / union
        gt_empty = not g.any()
        if no_target is None:
            no_target = gt_empty
        elif no_target and not gt_empty:
            raise ValueError("a no-target sample has a non-empty ground truth; check the shard's mask and no_target")
        if no_target:
            self.no_target += 1
            self.no_target_empty += int(not p.any())
        else:
            self.with_target += 1
            self.with_target_found += int(bool(p.any()))
        self.ious.append(iou)
        self.inter += inter
        self.union += union
        # per-class counts: a bool mask is class 1 of a binary problem
        pl = pred.astype(np.int64) if pred.dtype != bool else p.astype(np.int64)
        gl = gt.astype(np.int64) if gt.dtype != bool else g.astype(np.int64)
        classes = np.union1d(np.unique(pl), np.unique(gl))
        for c in classes.tolist():
            if c == 0 and not self.include_background:
                continue
            pc, gc = pl == c, gl == c
            self.class_inter[c] = self.class_inter.get(c, 0) + int(np.count_nonzero(pc & gc))
            self.class_union[c] = self.class_union.get(c, 0) + int(np.count_nonzero(pc | gc))
        self.repairs.append(int(repairs))
        if tokens is not None:
            self.tokens.append(int(tokens))
        if seconds is not None:
            self.seconds.append(float(seconds))
        return iou

    def merge(self, other: SegMeter) -> SegMeter:
        """Add another meter's samples (e.g. from another process) into this one; returns self."""
        self.ious += other.ious
        self.repairs += other.repairs
        self.tokens += other.tokens
        self.seconds += other.seconds
        self.inter += other.inter
        self.union += other.union
        for c, v in other.class_inter.items():
            self.class_inter[c] = self.class_inter.get(c, 0) + v
        for c, v in other.class_union.items():
            self.class_union[c] = self.class_union.get(c, 0) + v
        self.no_target += other.no_target
        self.no_target_empty += other.no_target_empty
        self.with_target += other.with_target
        self.with_target_found += other.with_target_found
        return self

    def __len__(self) -> int:
        return len(self.ious)

    def class_ious(self) -> dict[int, float]:
        """IoU per class seen in any ground truth or prediction (union > 0), over the whole set."""
        return {c: self.class_inter[c] / u for c, u in sorted(self.class_union.items()) if u > 0}

    def summary(self) -> dict:
        """The set's metrics.

        Returns:
            ``n``; ``giou``, ``ciou`` (cIoU is 1.0 when every union is empty); ``miou`` (None when no class
            occurs) and ``miou_classes`` (how many classes it averages); ``repair_rate`` (fraction of samples
            with >= 1 repair) and ``mean_repairs``; ``mean_tokens``; ``latency_median`` and ``latency_p90`` in
            seconds; ``n_no_target``, ``n_acc`` (no-target samples predicted empty / no-target samples) and ``t_acc``
            (with-target samples predicted non-empty / with-target samples). Values without data are None (``n_acc``
            on a set without no-target samples, ``t_acc`` on one with only no-target samples).
        """
        n = len(self.ious)
        per_class = self.class_ious()
        sec = np.asarray(self.seconds, dtype=np.float64)
        return {
            "n": n,
            "giou": float(np.mean(self.ious)) if n else None,
            "ciou": (self.inter / self.union if self.union else 1.0) if n else None,
            "miou": float(np.mean(list(per_class.values()))) if per_class else None,
            "miou_classes": len(per_class),
            "repair_rate": float(np.mean([r > 0 for r in self.repairs])) if n else None,
            "mean_repairs": float(np.mean(self.repairs)) if n else None,
            "mean_tokens": float(np.mean(self.tokens)) if self.tokens else None,
            "latency_median": float(np.median(sec)) if sec.size else None,
            "latency_p90": float(np.percentile(sec, 90)) if sec.size else None,
            "n_no_target": self.no_target,
            "n_acc": self.no_target_empty / self.no_target if self.no_target else None,
            "t_acc": self.with_target_found / self.with_target if self.with_target else None,
        }

"""Segmentation metrics against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from mmtok.mllm.seg.metrics import SegMeter, mask_iou


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_mask_iou_hand_computed():
    gt = box(4, 4, 0, 2, 0, 2)  # 4 px
    pred = box(4, 4, 0, 2, 0, 3)  # 6 px, 4 shared
    assert mask_iou(pred, gt) == pytest.approx(4 / 6)
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0  # empty / empty
    assert mask_iou(np.zeros((3, 3), bool), box(3, 3, 0, 1, 0, 1)) == 0.0
    assert mask_iou(pred.astype(np.uint8) * 255, gt.astype(np.int64)) == pytest.approx(4 / 6)  # > 0 is foreground
    with pytest.raises(ValueError, match="resize"):
        mask_iou(np.zeros((3, 3)), np.zeros((4, 4)))


def test_meter_giou_ciou_repairs():
    meter = SegMeter()
    assert meter.update(box(4, 4, 0, 2, 0, 3), box(4, 4, 0, 2, 0, 2), repairs=0, tokens=10, seconds=0.1) == 4 / 6
    assert meter.update(np.zeros((4, 4), bool), np.zeros((4, 4), bool), repairs=2, tokens=20, seconds=0.3) == 1.0
    assert meter.update(np.zeros((4, 4), bool), box(4, 4, 0, 1, 0, 2), repairs=0, tokens=30, seconds=0.2) == 0.0
    s = meter.summary()
    assert s["n"] == 3
    assert s["giou"] == pytest.approx((4 / 6 + 1 + 0) / 3)
    assert s["ciou"] == pytest.approx(4 / (6 + 0 + 2))  # I = 4 + 0 + 0, U = 6 + 0 + 2
    assert s["miou"] == pytest.approx(0.5) and s["miou_classes"] == 1  # binary: class 1 only = cIoU
    assert s["repair_rate"] == pytest.approx(1 / 3) and s["mean_repairs"] == pytest.approx(2 / 3)
    assert s["mean_tokens"] == 20 and s["latency_median"] == pytest.approx(0.2)
    assert s["latency_p90"] == pytest.approx(0.28)


def test_meter_empty_empty_and_empty_set():
    meter = SegMeter()
    meter.update(np.zeros((2, 2), bool), np.zeros((2, 2), bool))
    s = meter.summary()
    assert s["giou"] == 1.0 and s["ciou"] == 1.0 and s["miou"] is None and s["miou_classes"] == 0
    empty = SegMeter().summary()
    assert empty["n"] == 0 and empty["giou"] is None and empty["mean_tokens"] is None


def test_meter_miou_semantic():
    gt = np.array([[1, 1, 2, 2], [0, 0, 2, 2]])
    pred = np.array([[1, 0, 2, 2], [0, 0, 2, 3]])
    # class 1: I 1, U 2; class 2: I 3, U 4; class 3 (only predicted): I 0, U 1
    meter = SegMeter()
    meter.update(pred, gt)
    assert meter.class_ious() == {1: 0.5, 2: 0.75, 3: 0.0}
    assert meter.summary()["miou"] == pytest.approx((0.5 + 0.75 + 0.0) / 3)
    # gIoU/cIoU treat every label > 0 as foreground: pred has 5 foreground pixels, all inside gt's 6
    assert meter.summary()["ciou"] == pytest.approx(5 / 6)
    with_bg = SegMeter(include_background=True)
    with_bg.update(pred, gt)
    # background: gt zeros (1,0) (1,1); pred zeros (0,1) (1,0) (1,1): I 2, U 3
    assert with_bg.summary()["miou"] == pytest.approx((2 / 3 + 0.5 + 0.75 + 0.0) / 4)


def test_meter_miou_sums_over_the_set_and_merges():
    a, b = SegMeter(), SegMeter()
    a.update(np.array([[1, 1]]), np.array([[1, 0]]))  # class 1: I 1, U 2
    b.update(np.array([[0, 1]]), np.array([[1, 1]]))  # class 1: I 1, U 2
    b.update(np.array([[2, 2]]), np.array([[2, 2]]))  # class 2: I 2, U 2
    a.merge(b)
    assert len(a) == 3
    assert a.class_ious() == {1: 2 / 4, 2: 1.0}
    assert a.summary()["miou"] == pytest.approx(0.75)
    assert a.summary()["ciou"] == pytest.approx((1 + 1 + 2) / (2 + 2 + 2))

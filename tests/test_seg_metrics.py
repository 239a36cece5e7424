"""Segmentation metrics against hand-computed cases, and the refinement step (grid -> pixels) they score."""

from __future__ import annotations

import numpy as np
import pytest

from mmtok.mllm.seg import refine as R
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


# ------------------------------------------------------------------------------------------------ refinement
# (mmtok.mllm.seg.refine: the grid-to-pixels step whose output these metrics score)


@pytest.mark.parametrize(
    ("grid", "size"), [((16, 16), (64, 64)), ((8, 5), (37, 91)), ((3, 7), (2, 3)), ((1, 4), (5, 9))]
)
def test_bilinear_equals_torch(grid, size):
    torch = pytest.importorskip("torch")
    g = np.random.default_rng(0).random(grid).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(g)[None, None], size=size, mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(R.upsample_bilinear(g, *size), ref, atol=1e-6)
    np.testing.assert_allclose(R.refine(g, np.zeros((*size, 3), np.uint8), "bilinear"), ref, atol=1e-6)


def test_box_mean_matches_brute_force():
    x = np.random.default_rng(1).random((7, 9))
    got = R.box_mean(x, 2)
    for i in range(7):
        for j in range(9):
            assert got[i, j] == pytest.approx(x[max(0, i - 2) : i + 3, max(0, j - 2) : j + 3].mean())


def test_guided_filter_preserves_a_constant():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    out = R.refine(np.full((8, 10), 0.7), image, "guided", radius=3, eps=1e-4)
    np.testing.assert_allclose(out, 0.7, atol=1e-6)


def step_scene():
    """A 64 x 64 image with a vertical edge at column 37 (off the 8-px grid) and the mask right of it."""
    rng = np.random.default_rng(3)
    image = np.zeros((64, 64, 3), dtype=np.int64)
    image[:, :37], image[:, 37:] = 50, 200
    image = np.clip(image + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
    gt = np.zeros((64, 64), dtype=bool)
    gt[:, 37:] = True
    return image, gt


def test_guided_snaps_a_blurred_step_to_the_image_edge():
    image, gt = step_scene()
    soft = gt.reshape(8, 8, 8, 8).mean(axis=(1, 3))  # the coarse, blurred step (cell 4 is 3/8 covered)
    iou = {m: mask_iou(R.refine_mask(soft, image, m), gt) for m in ("none", "bilinear", "guided")}
    assert iou["guided"] > iou["bilinear"] >= iou["none"]
    assert iou["guided"] > 0.99
    edge = np.argmax(R.refine(soft, image, "guided")[10] > 0.5)
    assert edge == 37  # bilinear puts it at 38, nearest at 40


def test_colour_guide_with_equal_channels_is_the_grey_filter_at_a_third_of_eps():
    # Sigma = v 11^T + eps I has 1 as eigenvector (eigenvalue 3v + eps): a = c / (3v + eps) per channel, and
    # sum_c a_c * g = c g / (v + eps / 3): the grey filter with eps / 3.
    rng = np.random.default_rng(4)
    grey = rng.random((30, 40))
    src = rng.random((30, 40))
    got = R.colour_guided_filter(np.repeat(grey[..., None], 3, -1), src, radius=3, eps=3e-3)
    np.testing.assert_allclose(got, R.guided_filter(grey, src, radius=3, eps=1e-3), atol=1e-10)


def test_colour_guide_follows_an_edge_the_grey_guide_cannot_see():
    # A green box (off the 4-px grid) on red of (nearly) the same BT.601 luma, 102 * 0.587 ~ 200 * 0.299: the
    # grey guide sees no edge and only blurs the corners (below bilinear), the colour guide snaps to the box.
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:] = (200, 0, 0)
    image[13:30, 37:58] = (0, 102, 0)
    gt = np.zeros((64, 64), dtype=bool)
    gt[13:30, 37:58] = True
    soft = gt.reshape(16, 4, 16, 4).mean(axis=(1, 3))
    iou = {
        name: mask_iou(R.refine_mask(soft, image, method, **kw), gt)
        for name, method, kw in [
            ("bilinear", "bilinear", {}),
            ("colour", "guided", {}),
            ("grey", "guided", {"guide": "grey"}),
        ]
    }
    assert iou["colour"] > 0.99 > iou["bilinear"] > iou["grey"]
    with pytest.raises(ValueError, match="guide must be"):
        R.refine(soft, image, "guided", guide="hsv")


def test_guided_takes_a_grey_image():
    image, gt = step_scene()
    soft = gt.reshape(8, 8, 8, 8).mean(axis=(1, 3))
    np.testing.assert_allclose(
        R.refine(soft, image[..., 0], "guided"), R.refine(soft, image[..., 0], "guided", guide="grey")
    )


def test_refine_mask_threshold():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    scores = np.full((2, 2), 0.4, dtype=np.float32)
    assert not R.refine_mask(scores, image, "bilinear").any()
    assert R.refine_mask(scores, image, "bilinear", threshold=0.3).all()


def test_refine_decoded_bricks_and_errors():
    from mmtok.registries import SEG_FORMATS

    image, gt = step_scene()
    mask = np.zeros((64, 64), dtype=np.int64)
    mask[10:30, 20:40] = 1
    fmt = SEG_FORMATS.create("bricks", box_bins=32, brick_grid=8)
    d = fmt.decode(fmt.encode(mask, ["x"]), ["x"])
    near = R.refine_decoded(d, image, "none")
    assert (near == d.scores(64, 64)).all()
    for method in ("bilinear", "guided"):
        s = R.refine_decoded(d, image, method)
        assert s.shape == (64, 64) and s[:10].max() == 0 and s[30:].max() == 0 and 0 <= s.min() <= s.max() <= 1
    assert set(R.REFINERS) >= {"none", "bilinear", "guided"}
    with pytest.raises(ValueError, match="choose one of"):
        R.refine(np.zeros((4, 4)), image, "crf")


def test_picks_referred_compares_the_covered_share_of_each_instance():
    from mmtok.mllm.seg.metrics import picks_referred

    inst = np.zeros((4, 6), np.int64)
    inst[:, :2] = 1  # 8 px
    inst[:2, 3:] = 2  # 6 px
    pred = np.zeros((4, 6), bool)
    pred[:2, :2] = True  # half of instance 1
    pred[0, 3:] = True  # half of instance 2
    assert picks_referred(pred, inst, 1) is False  # a tie is not a pick
    pred[2, 0] = True  # now 5/8 of instance 1
    assert picks_referred(pred, inst, 1) is True and picks_referred(pred, inst, 2) is False
    assert picks_referred(pred, np.where(inst == 2, 0, inst), 1) is None  # one instance: nothing to choose
    assert picks_referred(pred, inst, 3) is None  # the referred instance is not in the map
    whole = np.ones((4, 6), bool)  # "every item" covers all alike: never a pick
    assert picks_referred(whole, inst, 1) is False

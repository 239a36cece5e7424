"""Mask-as-text formats: known-answer bytes, round trips, Text4Seg compatibility, total decoders under fuzzing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmtok.mllm.seg import formats as F
from mmtok.registries import SEG_FORMATS

NAMES = ["the red sneaker", "bag", "ankle boot"]


def random_mask(rng: np.random.Generator, h: int, w: int, k: int) -> np.ndarray:
    """A blobby mask with up to ``k`` labels (rectangles over background), like real masks."""
    m = np.zeros((h, w), dtype=np.int64)
    for lab in range(1, k + 1):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        m[y0 : y0 + rng.integers(1, h + 1), x0 : x0 + rng.integers(1, w + 1)] = lab
    return m


def text4seg_parse(text: str) -> list[str]:
    """Text4Seg's reading of a block (its published rules): the labels of the cells in raster order.

    Body = between the first ``<seg>`` and ``</seg>``; strip newlines; rows split on ``"\\n "``; runs on
    ``"| "``; each run ``"label *count"`` split on ``" *"``. Written here from their documented format.
    """
    body = text.split("<seg>")[1].split("</seg>")[0]
    out: list[str] = []
    for row in body.strip("\n").split("\n "):
        for run in row.split("| "):
            label, count = run.split(" *")
            out += [label] * int(count)
    return out


# ------------------------------------------------------------------------------------------------ bytes
def test_rrle_known_answer_2x3():
    fmt = SEG_FORMATS.create("rrle", grid=[2, 3])
    mask = np.array([[0, 1, 1], [0, 0, 0]])
    assert fmt.encode(mask, ["cat"]) == "<seg>others *1| cat *2\n others *3\n</seg>"


def test_rrle_known_answer_4x4():
    fmt = SEG_FORMATS.create("rrle", grid=4)
    mask = np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 2], [2, 2, 2, 2]])
    expected = "<seg>others *4\n others *1| dog *2| others *1\n others *1| dog *2| grass *1\n grass *4\n</seg>"
    text = fmt.encode(mask, ["dog", "grass"])
    assert text == expected
    assert text.endswith("*4\n</seg>")
    d = fmt.decode(text, ["dog", "grass"])
    assert d.repairs == 0 and (d.labels == mask).all()


def test_descriptors_known_answer():
    fmt = SEG_FORMATS.create("descriptors", grid=[2, 3])
    assert fmt.encode(np.array([[0, 1, 1], [0, 0, 2]]), ["cat", "dog"]) == (
        "<seg>others| cat| cat| others| others| dog</seg>"
    )
    # Text4Seg splits on "|" and strips: the no-space and spaced variants read the same, without repairs
    variants = ("<seg>others|cat|cat|others|others|dog</seg>", "<seg>others | cat | cat | others | others | dog</seg>")
    for text in variants:
        d = fmt.decode(text, ["cat", "dog"])
        assert d.repairs == 0 and d.labels.tolist() == [[0, 1, 1], [0, 0, 2]]


def test_bricks_known_answer():
    fmt = SEG_FORMATS.create("bricks", box_bins=8, brick_grid=2)
    mask = np.zeros((16, 16), dtype=np.int64)
    mask[4:8, 6:8] = 1  # x in [6, 8), y in [4, 8): bins of 2 px -> [3, 2, 4, 4]
    assert fmt.encode(mask, ["cat"]) == "<seg>[3,2,4,4]\n cat *2\n cat *2\n</seg>"
    assert fmt.encode(np.zeros((16, 16), dtype=np.int64), ["cat"]) == "<seg>none</seg>"
    d = fmt.decode("<seg>[3,2,4,4]\n cat *2\n cat *2\n</seg>", ["cat"])
    assert d.repairs == 0 and d.box == (3 / 8, 2 / 8, 4 / 8, 4 / 8)
    assert (d.mask(16, 16) == mask).all()


def test_our_rrle_reads_in_text4seg_and_theirs_here():
    rng = np.random.default_rng(0)
    fmt = SEG_FORMATS.create("rrle", grid=16)
    for _ in range(20):
        mask = random_mask(rng, 37, 53, 3)
        text = "Sure, it is [SEG].\n" + fmt.encode(mask, NAMES)
        cells = fmt.grid_labels(mask).reshape(-1)
        assert text4seg_parse(text) == [(["others"] + NAMES)[i] for i in cells]


# ------------------------------------------------------------------------------------------------ resize
@pytest.mark.parametrize("size", [(64, 64), (37, 53), (10, 7), (480, 640), (128, 96)])
@pytest.mark.parametrize("grid", [8, 16, 24, 32, (12, 20)])
def test_grid_labels_equal_pil_nearest(size, grid):
    """Our nearest resize is Text4Seg's: PIL ``Image.resize(NEAREST)``, to the pixel (incl. float rounding)."""
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 4, size=size).astype(np.uint8)
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    fmt = SEG_FORMATS.create("rrle", grid=[gh, gw])
    pil = np.asarray(Image.fromarray(mask).resize((gw, gh), Image.NEAREST))
    assert (fmt.grid_labels(mask) == pil).all()


def test_nearest_index_rules():
    assert F.nearest_index(64, 16).tolist() == list(range(2, 64, 4))  # cell centres
    assert F.nearest_index(4, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    up = F.resize_nearest(np.arange(4).reshape(2, 2), 4, 4)
    assert up.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


# ------------------------------------------------------------------------------------------------ round trips
FORMAT_SETTINGS = [
    ("rrle", {"grid": 16}),
    ("rrle", {"grid": 8}),
    ("rrle", {"grid": [12, 20]}),
    ("descriptors", {"grid": 16}),
    ("descriptors", {"grid": [24, 32]}),
    ("bricks", {"box_bins": 32, "brick_grid": 16}),
    ("bricks", {"box_bins": 64, "brick_grid": [8, 12]}),
]


@pytest.mark.parametrize(("name", "kw"), FORMAT_SETTINGS)
def test_round_trip_exact_at_grid(name, kw):
    rng = np.random.default_rng(2)
    fmt = SEG_FORMATS.create(name, **kw)
    for _ in range(30):
        h, w = int(rng.integers(5, 90)), int(rng.integers(5, 90))
        k = int(rng.integers(0, 4))
        mask = random_mask(rng, h, w, k)
        names = NAMES[:k]
        text = fmt.encode(mask, names)
        d = fmt.decode(text, names)
        assert d.repairs == 0, (text, d.notes)
        assert d.labels.shape == fmt.grid_shape
        assert (d.labels == fmt.grid_labels(mask)).all()
        oracle = fmt.oracle(mask, names)
        assert (d.mask(h, w) == oracle.mask(h, w)).all()
        # names=None collects the labels in order of appearance; the same cells get the same texts
        free = fmt.decode(text)
        texts = np.array(["others", *free.names], dtype=object)[free.labels]
        assert (texts == np.array(["others", *names], dtype=object)[d.labels]).all()
        assert free.names == [NAMES[j - 1] for j in dict.fromkeys(d.labels.reshape(-1).tolist()) if j > 0]


def test_bricks_box_holds_the_object():
    rng = np.random.default_rng(3)
    fmt = SEG_FORMATS.create("bricks", box_bins=32, brick_grid=16)
    for _ in range(50):
        h, w = int(rng.integers(8, 200)), int(rng.integers(8, 200))
        mask = random_mask(rng, h, w, 1)
        d = fmt.oracle(mask, ["x"])
        x0, y0, x1, y1 = d.pixel_box(h, w)
        ys, xs = np.nonzero(mask)
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
        # the box is tight up to one bin on each side
        assert xs.min() - x0 <= w / 32 + 1 and x1 - 1 - xs.max() <= w / 32 + 1


def test_bricks_small_objects_beat_rrle():
    """A small object at full in-box resolution: higher oracle IoU than a 16 x 16 image grid."""
    mask = np.zeros((128, 128), dtype=np.int64)
    yy, xx = np.mgrid[:128, :128]
    mask[(yy - 40) ** 2 + (xx - 90) ** 2 < 49] = 1  # a disc of radius 7
    iou = {}
    for name, kw in (("rrle", {"grid": 16}), ("bricks", {"box_bins": 32, "brick_grid": 8})):
        pred = SEG_FORMATS.create(name, **kw).oracle(mask, ["x"]).mask(128, 128)
        iou[name] = (pred & mask).sum() / (pred | mask).sum()
    assert iou["bricks"] > iou["rrle"] + 0.1


def test_word_tokenizer_spacing_decodes_the_same():
    fmt = SEG_FORMATS.create("rrle", grid=16)
    rng = np.random.default_rng(4)
    mask = random_mask(rng, 64, 64, 2)
    text = "sure , here is the mask .\n" + fmt.encode(mask, NAMES[:2])
    spaced = text.replace("*", " * ").replace("|", " | ").replace("\n", " ").replace("<seg>", "< seg > ")
    spaced = spaced.replace("</seg>", " </ seg >").upper()
    ref = fmt.decode(text, NAMES[:2])
    d = fmt.decode(spaced, NAMES[:2])
    assert d.repairs == 0 and (d.labels == ref.labels).all()
    cells = fmt.decode("<seg>others * 12 | the red sneaker * 4</seg>", NAMES).labels.reshape(-1)
    assert cells[12:16].tolist() == [1] * 4


@pytest.mark.parametrize("name", ["rrle", "descriptors", "bricks"])
def test_builtin_word_tokenizer_round_trip(name):
    """Through mmtok's word-level tokenizer (newlines lost, spaces everywhere) the grid comes back exactly."""
    from mmtok.mllm.text import build_fashion_tokenizer

    tok = build_fashion_tokenizer(seg=True)
    fmt = SEG_FORMATS.create(name, grid=16)
    mask = random_mask(np.random.default_rng(8), 64, 64, 2)
    names = ["the red sneaker", "bag"]
    back = tok.decode(tok(fmt.encode(mask, names), add_special_tokens=False)["input_ids"])
    assert "\n" not in back
    d = fmt.decode(back, names)
    assert d.repairs == 0 and (d.labels == fmt.grid_labels(mask)).all()


def test_bricks_word_tokenizer_spacing():
    fmt = SEG_FORMATS.create("bricks")
    mask = random_mask(np.random.default_rng(5), 50, 70, 1)
    text = fmt.encode(mask, ["bag"])
    spaced = text.replace("[", " [ ").replace(",", " , ").replace("]", " ] ").replace("*", " * ").replace("\n", " ")
    a, b = fmt.decode(text, ["bag"]), fmt.decode(spaced, ["bag"])
    assert b.repairs == 0 and (a.labels == b.labels).all() and a.box == b.box


# ------------------------------------------------------------------------------------------------ repairs
def test_text4seg_repair_rules():
    fmt = SEG_FORMATS.create("rrle", grid=[2, 3])
    short = fmt.decode("<seg>others *1| cat *2\n</seg>", ["cat"])  # 3 of 6 cells: pad with the last label
    assert short.labels.tolist() == [[0, 1, 1], [1, 1, 1]] and short.repairs == 1
    long = fmt.decode("<seg>others *1| cat *2\n others *3\n cat *9\n</seg>", ["cat"])
    assert long.labels.tolist() == [[0, 1, 1], [0, 0, 0]] and long.repairs == 1
    unknown = fmt.decode("<seg>others *1| dog *2\n others *3\n</seg>", ["cat"])
    assert unknown.labels.tolist() == [[0, 0, 0], [0, 0, 0]] and unknown.repairs == 1
    none = fmt.decode("I cannot find it.", ["cat"])
    assert none.labels.sum() == 0 and none.repairs == 1
    truncated = fmt.decode("<seg>others *1| cat *2\n others *", ["cat"])
    assert truncated.labels.tolist() == [[0, 1, 1], [0, 0, 0]] and truncated.repairs >= 2
    huge = fmt.decode("<seg>cat *99999999999\n</seg>", ["cat"])
    assert huge.labels.sum() == 6 and huge.repairs == 1


def test_names_with_grammar_characters_round_trip():
    fmt = SEG_FORMATS.create("rrle", grid=4)
    mask = np.zeros((8, 8), dtype=np.int64)
    mask[:4, :4] = 1
    names = ["a|b*c [x]", "the <unk>"]
    text = fmt.encode(mask, names)
    assert "a b c x" in text
    d = fmt.decode(text, names)
    assert d.repairs == 0 and (d.labels == fmt.grid_labels(mask)).all() and d.names == names
    assert fmt.decode("<seg>the <unk> *16\n</seg>", names).labels.max() == 2


def test_encode_rejects_bad_input():
    fmt = SEG_FORMATS.create("rrle")
    with pytest.raises(F.SegFormatError, match="names"):
        fmt.encode(np.full((4, 4), 2), ["cat"])
    with pytest.raises(F.SegFormatError, match="reserved"):
        fmt.encode(np.ones((4, 4), int), ["others"])
    with pytest.raises(F.SegFormatError, match="collide"):
        fmt.encode(np.ones((4, 4), int), ["Cat", "cat"])
    with pytest.raises(F.SegFormatError, match=r"\[H, W\]"):
        fmt.encode(np.ones((2, 4, 4), int), ["cat"])
    with pytest.raises(F.SegFormatError):
        SEG_FORMATS.create("rrle", grid=0)


# ------------------------------------------------------------------------------------------------ fuzzing
ALPHABET = st.sampled_from(list("<>seg/|*[],0123456789 \n\t") + ["others", "cat", "é", "\u200b", "😀", "\x00"])


@pytest.mark.parametrize("name", ["rrle", "descriptors", "bricks"])
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=300), st.lists(ALPHABET, max_size=200).map("".join)))
def test_decode_total_on_random_text(name, text):
    fmt = SEG_FORMATS.create(name, grid=8)
    for names in (None, ["cat"]):
        d = fmt.decode(text, names)
        assert d.labels.shape == fmt.grid_shape and d.labels.dtype == np.int64
        assert d.repairs >= 0 and 0 <= d.labels.min() and d.labels.max() <= len(d.names)
        assert d.mask(9, 13).shape == (9, 13)


@st.composite
def mutated(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    name = draw(st.sampled_from(["rrle", "descriptors", "bricks"]))
    fmt = SEG_FORMATS.create(name, grid=8, **({"brick_grid": 8} if name == "bricks" else {}))
    text = fmt.encode(random_mask(rng, 24, 24, 2), ["cat", "red bag"])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["cut", "delete", "dup", "unknown", "insert"]))
        i = draw(st.integers(0, max(0, len(text) - 1)))
        j = draw(st.integers(i, len(text)))
        if op == "cut":
            text = text[:i]
        elif op == "delete":
            text = text[:i] + text[j:]
        elif op == "dup":
            text = text[:j] + text[i:j] + text[j:]
        elif op == "unknown":
            text = text.replace("cat", "zebra", 1)
        else:
            text = text[:i] + draw(st.text(max_size=5)) + text[i:]
    return fmt, text


@settings(max_examples=300, deadline=None, database=None)
@given(case=mutated())
def test_decode_total_on_mutated_encodings(case):
    fmt, text = case
    for names in (None, ["cat", "red bag"]):
        d = fmt.decode(text, names)
        assert d.labels.shape == fmt.grid_shape
        assert 0 <= d.labels.min() and d.labels.max() <= len(d.names)


@pytest.mark.parametrize("name", ["rrle", "descriptors", "bricks"])
def test_decode_one_megabyte(name):
    fmt = SEG_FORMATS.create(name)
    rng = np.random.default_rng(6)
    noise = "".join(rng.choice(list("ab *|\n0123456789<>[],é"), size=1 << 20))
    for text in (noise, "<seg>" + noise, "<seg>" + "cat *99999999999| " * 60000, "|" * (1 << 20)):
        d = fmt.decode(text)
        assert d.labels.shape == fmt.grid_shape and len(d.names) <= fmt.grid_shape[0] * fmt.grid_shape[1]


# ------------------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("name", SEG_FORMATS.list())
def test_registry_contract(name):
    fmt = SEG_FORMATS.create(name)
    assert fmt.name == name and isinstance(fmt, F.SegFormat)
    cfg = SEG_FORMATS.build_config(name)
    assert hasattr(cfg, "grid")
    mask = random_mask(np.random.default_rng(7), 40, 30, 2)
    text = fmt.encode(mask, ["cat", "dog"])
    assert text.startswith("<seg>") and text.endswith("</seg>")
    d = fmt.decode("Here it is.\n" + text, ["cat", "dog"])
    assert d.repairs == 0 and (d.labels == fmt.grid_labels(mask)).all()
    assert d.mask(40, 30).shape == (40, 30) and d.mask(40, 30).dtype == np.int64
    s = d.scores(40, 30, label=1)
    assert s.dtype == np.float32 and set(np.unique(s)) <= {0.0, 1.0}
    empty = fmt.encode(np.zeros((40, 30), int), ["cat"])
    assert fmt.decode(empty, ["cat"]).mask(40, 30).sum() == 0
    assert fmt.decode("", ["cat"]).labels.shape == fmt.grid_shape
    with pytest.raises(Exception, match="Valid keys"):
        SEG_FORMATS.create(name, gird=16)

"""Joint image/mask/video transforms and their per-sample seeding."""

from __future__ import annotations

import numpy as np
import torch

from mmtok.data import ShardDataset, write_shards
from mmtok.data.loader import ShardLoader
from mmtok.data.transforms import (
    CenterCrop,
    Compose,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    TemporalCrop,
    ToRGB,
    swap_left_right,
)


def _sample(seed=0):
    img = torch.rand(3, 20, 30)
    mask = torch.zeros(20, 30, dtype=torch.long)
    mask[5:10, 2:8] = 3  # class id 3 on the left
    return {
        "image": img,
        "mask": mask,
        "json": {"expression": "the red bag on the left", "bbox": [2, 5, 8, 10]},
        "__seed__": seed,
    }


def test_resize_keeps_mask_values_and_shapes():
    s = Resize(16)(_sample())
    assert s["image"].shape == (3, 16, 16) and s["mask"].shape == (16, 16)
    assert set(s["mask"].unique().tolist()) == {0, 3}  # nearest: no blended ids
    v = {"video": torch.rand(3, 4, 20, 30)}
    assert Resize((8, 12))(v)["video"].shape == (3, 4, 8, 12)
    assert CenterCrop(10)(_sample())["mask"].shape == (10, 10)


def test_flip_moves_mask_and_fixes_text():
    flip = RandomHorizontalFlip(p=1.0)
    s = flip(_sample())
    assert s["mask"][5:10, 22:28].eq(3).all() and s["mask"][:, :8].eq(0).all()
    assert s["json"]["expression"] == "the red bag on the right" and s["json"]["bbox"] == [22, 5, 28, 10]
    assert swap_left_right("left of the leftmost, right") == "right of the leftmost, left"
    assert RandomHorizontalFlip(p=0.0)(_sample())["json"]["expression"] == "the red bag on the left"


def test_random_crop_is_a_function_of_the_sample_seed():
    t = RandomResizedCrop(12, scale=(0.2, 0.6))
    a, b, c = t(_sample(5)), t(_sample(5)), t(_sample(6))
    img = _sample()["image"]
    a_img = Compose([t])({**_sample(5), "image": img.clone()})["image"]
    b_img = Compose([t])({**_sample(5), "image": img.clone()})["image"]
    c_img = Compose([t])({**_sample(6), "image": img.clone()})["image"]
    assert torch.equal(a_img, b_img) and not torch.equal(a_img, c_img)
    assert a["image"].shape == (3, 12, 12) and set(a["mask"].unique().tolist()) <= {0, 3}
    assert b["mask"].shape == c["mask"].shape == (12, 12)


def test_video_and_channel_helpers():
    v = {"video": torch.rand(1, 5, 8, 8), "__seed__": 1}
    out = TemporalCrop(3)(v)
    assert out["video"].shape == (1, 3, 8, 8)
    assert TemporalCrop(8)({"video": torch.rand(3, 5, 8, 8)})["video"].shape[1] == 8  # loops short clips
    assert ToRGB()({"image": torch.rand(1, 4, 4)})["image"].shape == (3, 4, 4)


def test_augmentations_replay_exactly_on_resume(tmp_path):
    rng = np.random.default_rng(0)
    write_shards(
        ({"__key__": f"k{i:03d}", "png": rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)} for i in range(40)),
        tmp_path,
        prefix="t",
        maxcount=10,
    )
    tf = Compose([RandomResizedCrop(8), RandomHorizontalFlip()])

    def make():
        return ShardLoader(ShardDataset(str(tmp_path / "t.json"), transform=tf, shuffle_buffer=8), 4, num_workers=2)

    ref = torch.cat([b["image"] for b in make()])
    first = make()
    it = iter(first)
    head = [next(it)["image"] for _ in range(3)]
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    got = torch.cat(head + [b["image"] for b in resumed])
    assert torch.equal(got, ref)

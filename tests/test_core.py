"""Registry, config and hub contracts."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mmtok import hub, registries
from mmtok.config import ConfigError, load_run_config
from mmtok.registry import Registry, RegistryError


@dataclass
class _Cfg:
    width: int = 4
    depth: int = 1


def test_registry_create_merges_and_rejects_unknown():
    reg = Registry("widget")

    @reg.register("widget_small", config=_Cfg, aliases=("ws",), defaults={"width": 8})
    class Widget:
        def __init__(self, cfg):
            self.cfg = cfg

    assert reg.create("widget_small").cfg == _Cfg(width=8, depth=1)
    assert reg.create("ws", depth=3).cfg == _Cfg(width=8, depth=3)
    with pytest.raises(RegistryError, match="Did you mean 'width'"):
        reg.create("widget_small", widht=3)
    with pytest.raises(RegistryError, match="Did you mean 'widget_small'"):
        reg.create("widget_smal")
    with pytest.raises(RegistryError, match="already registered"):
        reg.add("ws", Widget)
    assert reg.list() == ["widget_small"] and "ws" in reg


def test_registry_validates_defaults_at_registration():
    reg = Registry("widget")
    with pytest.raises(RegistryError, match="unknown key 'wdth'"):
        reg.add("bad", object, config=_Cfg, defaults={"wdth": 1})


class _Net(nn.Module, hub.HubMixin):
    hub_kind = "test-net"

    def __init__(self, cfg: _Cfg):
        super().__init__()
        self.config = cfg
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.head = nn.Linear(cfg.width, 2)
        self.head.weight = self.proj.weight if cfg.width == 2 else self.head.weight


def test_hub_roundtrip_and_mismatch(tmp_path, monkeypatch):
    reg = Registry("test-net")
    reg.add("net", _Net, config=_Cfg)
    monkeypatch.setitem(registries._BY_KIND, "test-net", reg)
    net = reg.create("net", width=6)
    assert net.hub_name == "net"
    out = net.save_pretrained(tmp_path / "m")
    meta = json.loads((out / "config.json").read_text())
    assert meta["config"] == {"width": 6, "depth": 1} and meta["kind"] == "test-net"
    back = _Net.from_pretrained(out)
    for (k, a), (_, b) in zip(net.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    # a config that does not match the weights names the tensor and both shapes
    meta["config"]["width"] = 5
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(hub.CheckpointError, match=r"proj.weight.*\(6, 6\).*\(5, 5\)"):
        hub.from_pretrained(out)
    with pytest.raises(hub.CheckpointError, match="not an mmtok model folder"):
        hub.from_pretrained(tmp_path)
    with pytest.raises(hub.CheckpointError, match="not a 'tokenizer'"):
        meta["config"]["width"] = 6
        (out / "config.json").write_text(json.dumps(meta))
        hub.from_pretrained(out, kind="tokenizer")


def test_hub_atomic_write_keeps_old_folder_on_failure(tmp_path):
    target = tmp_path / "m"
    hub.atomic_write_dir(target, lambda d: (d / "a.txt").write_text("old"))

    def broken(d):
        (d / "a.txt").write_text("new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        hub.atomic_write_dir(target, broken)
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folder left behind


def test_run_config_errors(tmp_path):
    y = tmp_path / "a.yaml"
    y.write_text("train:\n  steps: 5\n")
    cfg = load_run_config([y], ["data.batch_size=4"], validate_task=False)
    assert cfg.train.steps == 5 and cfg.data.batch_size == 4
    with pytest.raises(ConfigError, match="Did you mean 'steps'"):
        load_run_config([y], ["train.stepz=3"], validate_task=False)
    with pytest.raises(ConfigError, match="train.steps"):
        load_run_config([y], ["train.steps=many"], validate_task=False)
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config([tmp_path / "nope.yaml"])
    with pytest.raises(ConfigError, match="key=value"):
        load_run_config([y], ["train.steps"])
    with pytest.raises(ConfigError, match="task.name"):
        load_run_config([y])


def test_cli_help_subprocess():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mmtok", "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("shards", "train", "eval", "prune", "segment", "bench", "demo"):
        assert name in out

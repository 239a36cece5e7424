"""Registry, config and hub contracts, and the layering of the core and the engine."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from mmtok import hub, registries
from mmtok.config import ConfigError, load_config
from mmtok.registry import Registry, RegistryError
from mmtok.train.config import RunConfig, load_run_config

REPO = Path(__file__).resolve().parents[1]


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
    with pytest.raises(ConfigError, match="Did you mean:? 'steps'") as bad_key:
        load_run_config([y], ["train.stepz=3"], validate_task=False)
    assert str(bad_key.value).count("Did you mean") == 1  # OmegaConf suggests it already: not twice
    assert "Valid keys in train:" in str(bad_key.value)
    with pytest.raises(ConfigError, match="train.steps"):
        load_run_config([y], ["train.steps=many"], validate_task=False)
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config([tmp_path / "nope.yaml"])
    with pytest.raises(ConfigError, match="key=value"):
        load_run_config([y], ["train.steps"])
    with pytest.raises(ConfigError, match="task.name"):
        load_run_config([y])
    listed = tmp_path / "list.yaml"
    listed.write_text("- train\n- data\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level .* must be a mapping.*not a list"):
        load_run_config([listed], validate_task=False)


def test_config_errors_are_one_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  steps: [1, 2\n")  # unterminated flow sequence: a multi-line yaml error
    with pytest.raises(ConfigError) as err:
        load_run_config([broken], validate_task=False)
    assert "broken.yaml is not valid YAML" in str(err.value) and "\n" not in str(err.value)


@dataclass
class _Inner:
    depth: int = 1


@dataclass
class _Outer:
    inner: _Inner
    name: str = "x"


def test_generic_loader_and_old_import_path():
    # The core loads any dataclass schema; the run schema is the engine's, still reachable the old way.
    cfg = load_config(_Outer, [], ["inner.depth=3", "name=y"])
    assert cfg == _Outer(_Inner(3), "y")
    with pytest.raises(ConfigError, match="Valid keys in inner: depth"):
        load_config(_Outer, [], ["inner.dpth=3"])
    import mmtok.config as core

    assert core.RunConfig is RunConfig and core.load_run_config is load_run_config


def _imports(path: Path) -> set[str]:
    """Modules a file imports anywhere in it (``from mmtok import x`` counts as ``mmtok.x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _under(module: str, packages: tuple[str, ...]) -> bool:
    """``module`` is one of ``packages`` or inside one (``mmtok.clip`` is not inside ``mmtok.cli``)."""
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_layering_core_engine_and_cli():
    capabilities = ("mmtok.tokenizers", "mmtok.mim", "mmtok.mllm")
    core = [REPO / "mmtok" / n for n in ("registry.py", "config.py", "hub.py")]
    core += sorted((REPO / "mmtok" / "layers").glob("*.py"))
    for f in core:
        bad = [m for m in _imports(f) if _under(m, (*capabilities, "mmtok.train", "mmtok.data", "mmtok.cli"))]
        assert not bad, f"{f.name} (core) imports {bad}"
    for f in sorted((REPO / "mmtok" / "train").glob("*.py")):
        bad = [m for m in _imports(f) if _under(m, (*capabilities, "mmtok.cli"))]
        assert not bad, f"mmtok/train/{f.name} (engine) imports {bad}"
    for f in sorted((REPO / "mmtok").rglob("*.py")):
        if f.parent.name == "cli" or f == REPO / "mmtok" / "__main__.py":  # the command itself
            continue
        bad = [m for m in _imports(f) if _under(m, ("mmtok.cli", "demo", "tools"))]
        assert not bad, f"{f.relative_to(REPO)} imports {bad}"
    # and at run time: loading a config pulls in no engine or data module
    code = "import sys, mmtok.config; print([m for m in sys.modules if m.startswith(('mmtok.train', 'mmtok.data'))])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_help_subprocess():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mmtok", "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("shards", "train", "eval", "prune", "segment", "bench", "demo"):
        assert name in out

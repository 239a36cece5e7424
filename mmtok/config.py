"""Run configs: dataclass schemas merged from YAML files and ``key=value`` overrides with OmegaConf.

A run config has five blocks::

    task:      {name: <registered task>, ...its config fields}
    data:      DataConfig      (mmtok/data/config.py)
    optim:     OptimConfig     (mmtok/train/config.py)
    train:     TrainConfig
    deepspeed: DeepSpeedConfig
    output_dir: runs/<name>

``load_run_config(["a.yaml", "b.yaml"], ["train.steps=10"])`` merges the files in order, then the
overrides, checks every key and type against the schema (the task block against the task's own config
class), and returns a :class:`RunConfig`. Errors are :class:`ConfigError` with the offending key, the
valid keys and a close-match suggestion, raised before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmtok.data.config import DataConfig
from mmtok.registry import RegistryError
from mmtok.train.config import DeepSpeedConfig, OptimConfig, TrainConfig


class ConfigError(ValueError):
    """A config that cannot be used, with a message saying how to fix it."""


@dataclass
class RunConfig:
    task: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    output_dir: str = "runs/default"

    def task_config(self) -> Any:
        """The task block validated against the task's registered config class."""
        from mmtok import registries

        spec = dict(self.task)
        name = spec.pop("name", None)
        if not name:
            raise ConfigError("the config has no task.name; set e.g. `task: {name: toy_classifier}`")
        try:
            return registries.get("task").build_config(name, **spec)
        except RegistryError as e:
            raise ConfigError(f"task block: {e}") from e


def _suggest_key(err: OmegaConfBaseException) -> str:
    key = getattr(err, "key", None)
    parent = getattr(err, "parent_node", None) or getattr(err, "child_node", None)
    if not key or parent is None:
        return ""
    try:
        choices = list(parent.keys()) if isinstance(parent, DictConfig) else []
    except Exception:  # noqa: BLE001 - suggestions are best effort
        return ""
    close = difflib.get_close_matches(str(key), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def load_run_config(
    files: Sequence[str | Path] = (), overrides: Sequence[str] = (), validate_task: bool = True
) -> RunConfig:
    """Merge YAML ``files`` then ``overrides`` (``a.b=value``) onto the schema and validate.

    Raises:
        ConfigError: unknown key, wrong type, missing file or bad override syntax.
    """
    base = OmegaConf.structured(RunConfig)
    layers = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as e:  # yaml errors come in several types
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key=value (e.g. train.steps=100)")
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(base, *layers)
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        msg = str(e).split("\n")[0]
        valid = ""
        key = getattr(e, "full_key", "") or ""
        section = key.split(".")[0] if "." in key else ""
        if section:
            dc = {f.name: f.type for f in dataclasses.fields(RunConfig)}.get(section)
            if isinstance(dc, type) and dataclasses.is_dataclass(dc):
                valid = f" Valid keys in {section}: {', '.join(f.name for f in dataclasses.fields(dc))}."
        else:
            valid = f" Top-level keys: {', '.join(f.name for f in dataclasses.fields(RunConfig))}."
        raise ConfigError(f"config error at {key or '?'}: {msg}.{_suggest_key(e)}{valid}") from e
    if cfg.data.on_error not in ("skip", "raise"):
        raise ConfigError(f"data.on_error must be 'skip' or 'raise', not {cfg.data.on_error!r}")
    if validate_task:
        cfg.task_config()
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (written to every run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain containers."""
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)

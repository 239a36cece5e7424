"""Config loading: dataclass schemas merged from YAML files and ``key=value`` overrides with OmegaConf.

This module is part of the core and knows no schema of its own: a caller hands it a dataclass and gets
an instance back. ``load_config(Schema, ["a.yaml", "b.yaml"], ["train.steps=10"])`` merges the files in
order, then the overrides, checks every key and type against ``Schema`` and returns the instance.
Dataclasses validate their own values in ``__post_init__`` (raising :class:`ConfigError`), so a
config built in Python gets the same errors as one read from YAML. Errors are :class:`ConfigError` with
the offending key, the valid keys of its block and one close-match suggestion, raised before any work
starts; the message is one line, fit for a command line.

The run config of ``mmtok train`` (task, data, optim, train, deepspeed blocks) belongs to the training
engine: :class:`mmtok.train.config.RunConfig` and :func:`mmtok.train.config.load_run_config`. The
names ``RunConfig`` and ``load_run_config`` are still importable from here for existing callers; they
resolve lazily, so importing this module never imports the engine or the data layer.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used, with a message saying how to fix it."""


def _one_line(text: str) -> str:
    """Collapse a (possibly multi-line) library message into one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _field_types(schema: type) -> dict[str, Any]:
    """``{field name: resolved type}`` of a dataclass (string annotations resolved)."""
    try:
        hints = typing.get_type_hints(schema)
    except Exception:  # noqa: BLE001 - an unresolvable annotation only costs us the key listing
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(schema)}


def _block_schema(schema: type, key: str) -> tuple[str, type | None]:
    """The dataclass holding the last part of the dotted ``key`` (and that block's dotted name)."""
    parts = key.split(".")[:-1]
    current: type | None = schema
    for part in parts:
        if current is None or not dataclasses.is_dataclass(current):
            return ".".join(parts), None
        nxt = _field_types(current).get(part)
        current = nxt if isinstance(nxt, type) and dataclasses.is_dataclass(nxt) else None
    return ".".join(parts), current


def _suggestion(key: str, block: type | None, message: str) -> str:
    """The ' Did you mean ...?' hint for a misspelled key, unless OmegaConf's message already has one."""
    if "did you mean" in message.lower() or block is None or not key:
        return ""
    name = key.split(".")[-1]
    close = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(block)], n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def _explain(err: OmegaConfBaseException, schema: type) -> ConfigError:
    """One-line :class:`ConfigError` for an OmegaConf merge/convert failure."""
    key = str(getattr(err, "full_key", "") or "")
    msg = _one_line(str(err).split("\n")[0]).rstrip(".")
    section, block = _block_schema(schema, key) if key else ("", None)
    if block is not None and key.split(".")[-1] in {f.name for f in dataclasses.fields(block)}:
        block = None  # a known key with a bad value: the type in OmegaConf's message is the hint
    # OmegaConf names an unknown key but not what would have been accepted: list the block's keys.
    if block is not None:
        where = f"in {section}" if section else "at the top level"
        valid = f" Valid keys {where}: {', '.join(f.name for f in dataclasses.fields(block))}."
    else:
        valid = ""
    stop = "" if msg.endswith("?") else "."
    return ConfigError(f"config error at {key or '?'}: {msg}{stop}{_suggestion(key, block, msg)}{valid}")


def _load_yaml(path: Path) -> DictConfig:
    """One YAML file as a mapping; a missing file, bad YAML or a non-mapping top level name the file."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - yaml and OmegaConf raise several unrelated types
        raise ConfigError(f"{path} is not valid YAML: {_one_line(e)}") from e
    if not isinstance(node, DictConfig):
        kind = "a list" if isinstance(node, ListConfig) else type(node).__name__
        raise ConfigError(
            f"{path}: the top level of a config file must be a mapping of blocks (task:, data:, train:, ...), "
            f"not {kind}"
        )
    return node


def load_config(schema: type[T], files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> T:
    """Merge YAML ``files`` then ``overrides`` (``a.b=value``) onto the dataclass ``schema`` and build it.

    Args:
        schema: A dataclass; nested dataclass fields become nested blocks. Its ``__post_init__`` (and
            those of nested blocks) may raise :class:`ConfigError` to reject values.
        files: YAML files, applied in order (later wins). Each must hold a mapping at the top level.
        overrides: ``key=value`` strings in OmegaConf's dot-list syntax, applied after the files.

    Returns:
        An instance of ``schema``.

    Raises:
        ConfigError: unknown key, wrong type, missing or unreadable file, bad override syntax or a value
            the schema rejects; always one line.
    """
    base = OmegaConf.structured(schema)
    layers = [_load_yaml(Path(f)) for f in files]
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key=value (e.g. train.steps=100)")
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(base, *layers)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise _explain(e, schema) from e


def to_yaml(cfg: Any) -> str:
    """A dataclass config as YAML (the resolved config written to every run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain containers."""
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


# Names that moved to the training engine, kept importable from here for existing callers
# (``from mmtok.config import load_run_config``). Resolved on first access only, so the core itself
# imports no engine; new code imports them from mmtok.train.config.
_MOVED = {"RunConfig": "mmtok.train.config", "load_run_config": "mmtok.train.config"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'mmtok.config' has no attribute {name!r}")

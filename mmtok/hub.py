"""Save and load model folders: ``config.json`` + ``model.safetensors`` (no pickles, ever).

A folder written by :func:`save_pretrained` records which registry entry built the model, so
:func:`from_pretrained` can rebuild it from the config alone and then load the weights. Writes are
atomic (everything goes to a temporary sibling folder that is renamed into place), so a crash never
leaves a half-written folder under the final name. Loading checks the kind, every key and every
shape, and names the first mismatch instead of failing inside ``load_state_dict``.

Any ``nn.Module`` with a dataclass ``config`` attribute and a registry entry can use these; modules
usually inherit :class:`HubMixin` to get ``model.save_pretrained(dir)`` / ``Cls.from_pretrained(dir)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A model folder that does not match what was asked for."""


def atomic_write_dir(final: str | os.PathLike, write: Any) -> Path:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``final`` atomically.

    An existing ``final`` is replaced only after the new folder is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        _fsync_dir(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, Mapping):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_pretrained(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    kind: str,
    name: str,
    config: Any,
    extra: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` to the folder ``path`` atomically.

    Args:
        model: The module whose ``state_dict`` is saved (tensors are made contiguous, shared storage
            is de-duplicated by cloning, so safetensors accepts it).
        kind: Registry kind, e.g. ``"tokenizer"``.
        name: Registry entry name that rebuilds the model from ``config``.
        config: The config dataclass (or mapping) passed to the entry.
        extra: More JSON fields stored under ``"extra"`` (e.g. preprocessing).
        extra_files: ``{file name: text}`` written beside the weights (e.g. a BPE vocabulary).
    """
    module = type(model).__module__
    meta = {
        "mmtok_format": FORMAT_VERSION,
        "kind": kind,
        "name": name,
        "module": module,
        "config": _to_jsonable(config),
        "extra": _to_jsonable(dict(extra or {})),
    }
    seen: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        # safetensors refuses tensors that share storage (tied weights): store a copy
        tensors[key] = t.clone().contiguous().cpu() if ptr in seen else t.contiguous().cpu()
        if ptr != -1:
            seen[ptr] = key

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "kind": kind, "name": name})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)

    return atomic_write_dir(path, write)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``config.json`` of an mmtok model folder."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{path} is not an mmtok model folder: {CONFIG_NAME} is missing. "
            "Pass a folder written by save_pretrained()."
        )
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); the folder is damaged") from e
    for key in ("kind", "name", "config"):
        if key not in meta:
            raise CheckpointError(f"{cfg_file} has no {key!r} field; it was not written by mmtok.save_pretrained")
    return meta


def load_state_dict_checked(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str = "") -> None:
    """``model.load_state_dict(state, strict=True)`` with an error that names the first mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {where} does not fit {type(model).__name__}: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. "
            "Was it saved from a different model or config?"
        )
    for key, t in own.items():
        if tuple(t.shape) != tuple(state[key].shape):
            raise CheckpointError(
                f"checkpoint {where}: {key!r} has shape {tuple(state[key].shape)} but the model expects "
                f"{tuple(t.shape)}. The config does not match the weights."
            )
    model.load_state_dict(state, strict=True)


def from_pretrained(
    path: str | os.PathLike, *, kind: str | None = None, map_location: str | torch.device = "cpu", **overrides: Any
) -> torch.nn.Module:
    """Rebuild a model from an mmtok folder and load its weights.

    Args:
        path: Folder written by :func:`save_pretrained`.
        kind: If given, the folder must hold a model of this registry kind.
        map_location: Device for the loaded tensors.
        overrides: Config fields to override (e.g. inference-only switches); unknown keys are rejected.
    """
    path = Path(path)
    meta = read_config(path)
    if kind is not None and meta["kind"] != kind:
        raise CheckpointError(f"{path} holds a {meta['kind']!r} ({meta['name']}), not a {kind!r}")
    module = meta.get("module", "")
    # Only mmtok's own modules are imported: a config file must never make us import arbitrary code.
    if module.startswith("mmtok.") or module == "mmtok":
        importlib.import_module(module)
    from mmtok import registries

    registry = registries.get(meta["kind"])
    model = registry.create(meta["name"], **{**meta["config"], **overrides})
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME}")
    state = load_file(str(weights), device=str(map_location))
    load_state_dict_checked(model, state, where=str(path))
    return model


class HubMixin:
    """Adds ``save_pretrained`` / ``from_pretrained`` to a module with ``config`` and a registry entry.

    Subclasses set ``hub_kind`` (registry kind) and ``hub_name`` (the entry name, set per instance by
    the registry factory or class attribute).
    """

    hub_kind: str = ""
    hub_name: str = ""

    def save_pretrained(self, path: str | os.PathLike, **kwargs: Any) -> Path:
        if not self.hub_kind or not self.hub_name:
            raise CheckpointError(f"{type(self).__name__} has no hub_kind/hub_name; it cannot be saved by name")
        return save_pretrained(self, path, kind=self.hub_kind, name=self.hub_name, config=self.config, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> Any:
        model = from_pretrained(path, kind=cls.hub_kind or None, **overrides)
        if not isinstance(model, cls):
            raise CheckpointError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

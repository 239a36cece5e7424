"""Checkpoints that are atomic, pruned to the last K, and restore a run exactly.

Layout of a run's ``checkpoints/`` folder::

    step-00000100/          one complete checkpoint (never seen half-written)
        model.safetensors   the task's state_dict (single process / DDP)
        optimizer.pt        optimizer state_dict (torch.save; loaded with weights_only=True)
        trainer_state.json  step, epoch, scheduler position, per-rank data position and RNG states
        <DeepSpeed files>   with DeepSpeed, engine.save_checkpoint writes its own files here instead
    latest                  text file naming the newest complete checkpoint (written atomically)

Every rank writes into ``.tmp-step-XXXXXXXX`` and rank 0 renames it to ``step-XXXXXXXX`` after a
barrier, so a process killed at any instant leaves either the previous checkpoint or the new one,
never a partial folder under a final name. Stale ``.tmp-*`` folders are removed on the next start.

RNG states (Python, NumPy, torch CPU, every CUDA device) are stored as JSON (torch states as base64)
so that nothing is ever unpickled on load.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmtok.hub import CheckpointError, _fsync_dir, atomic_write_text

logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.json"
MODEL_NAME = "model.safetensors"
OPTIM_NAME = "optimizer.pt"
LATEST_NAME = "latest"
_STEP_RE = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def tmp_dir_name(step: int) -> str:
    return f".tmp-step-{step:08d}"


# -- RNG ---------------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG of this process as JSON-able data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        states = [_unb64(s) for s in state["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:
            logger.warning(
                "checkpoint has RNG states for %d CUDA devices, this process sees %d: CUDA RNG not restored",
                len(states),
                torch.cuda.device_count(),
            )


# -- folders -------------------------------------------------------------------------------------
def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint: the ``latest`` pointer if valid, else the highest step folder."""
    root = Path(root)
    pointer = root / LATEST_NAME
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / STATE_NAME).is_file():
            return cand
        logger.warning("%s points to %s, which is not a complete checkpoint; scanning the folder", pointer, cand)
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(resume: str, root: str | os.PathLike) -> Path | None:
    """Turn ``--resume auto|never|PATH`` into a checkpoint folder (or None to start fresh)."""
    if resume in ("never", "no", "none", "", None):
        return None
    if resume == "auto":
        return find_latest(root)
    path = Path(resume)
    if path.is_dir() and not (path / STATE_NAME).is_file():
        latest = find_latest(path)  # a checkpoints/ folder or a run folder
        latest = latest or find_latest(path / "checkpoints")
        if latest is None:
            raise CheckpointError(f"--resume {path}: no complete checkpoint (step-XXXXXXXX/{STATE_NAME}) in it")
        return latest
    if not (path / STATE_NAME).is_file():
        raise CheckpointError(f"--resume {path}: not a checkpoint folder (no {STATE_NAME}); pass auto, never or a path")
    return path


def clean_stale(root: str | os.PathLike) -> None:
    """Remove temporary folders left by a process killed while writing (rank 0 only)."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(".tmp-step-") or p.name.startswith(".step-"):
            logger.info("removing unfinished checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)


def prepare_tmp(root: Path, step: int) -> Path:
    """Create an empty temporary folder for the checkpoint of ``step`` (rank 0, before a barrier)."""
    tmp = root / tmp_dir_name(step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finalize(root: Path, step: int, keep_last: int) -> Path:
    """Rename the temporary folder into place, move ``latest``, prune old ones (rank 0, after a barrier)."""
    tmp = root / tmp_dir_name(step)
    final = root / step_dir_name(step)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. a finished run started again)
        old = root / f".tmp-old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST_NAME, final.name + "\n")
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


# -- single-process / DDP payload ------------------------------------------------------------------
def save_model_state(model: torch.nn.Module, folder: Path) -> None:
    """The module's full state_dict to safetensors (tied weights stored once each, as copies)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        tensors[key] = (t.clone() if ptr in seen else t).contiguous().cpu()
        if ptr != -1:
            seen.add(ptr)
    save_file(tensors, str(folder / MODEL_NAME), metadata={"format": "pt"})


def load_model_state(model: torch.nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    from mmtok.hub import load_state_dict_checked

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    load_state_dict_checked(model, load_file(str(folder / MODEL_NAME), device=str(device)), where=str(folder))


def save_optimizer_state(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    torch.save(optimizer.state_dict(), folder / OPTIM_NAME)


def load_optimizer_state(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    path = folder / OPTIM_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no {OPTIM_NAME}; was it written by a DeepSpeed run? Resume with DeepSpeed."
        )
    # weights_only=True: tensors, numbers, strings and containers only, never arbitrary objects.
    optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def write_state(folder: Path, state: dict[str, Any]) -> None:
    (folder / STATE_NAME).write_text(json.dumps(state, indent=1, sort_keys=True, default=_json_default))


def read_state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {folder / STATE_NAME}: {e}") from e


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if torch.is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"checkpoint state value of type {type(obj).__name__} is not JSON-serialisable")

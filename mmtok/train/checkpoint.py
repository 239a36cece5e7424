"""Checkpoints that are atomic, pruned to the last K, and restore a run exactly.

Layout of a run's ``checkpoints/`` folder::

    step-00000100/          one complete checkpoint (never seen half-written)
        model.safetensors   the task's state_dict (single process / DDP)
        optimizer.pt        optimizer state_dict (torch.save; loaded with weights_only=True)
        trainer_state.json  step, epoch, scheduler position, per-rank data position and RNG states
        <DeepSpeed files>   with DeepSpeed, engine.save_checkpoint writes its own files here instead
        universal/          DeepSpeed only, made on demand: the universal form of the ZeRO states
    latest                  text file naming the newest complete checkpoint (written atomically)

Every rank writes into ``.tmp-step-XXXXXXXX`` and rank 0 renames it to ``step-XXXXXXXX`` after a
barrier, so a process killed at any instant leaves either the previous checkpoint or the new one,
never a partial folder under a final name. Stale ``.tmp-*`` folders are removed on the next start.

Another world size: the model, optimizer and scheduler files of a single-process / DDP run are full copies
and load at any world size. A DeepSpeed ZeRO checkpoint stores the optimizer state partitioned by rank;
:func:`ensure_universal` converts it once with DeepSpeed's own ``ds_to_universal`` (one folder per parameter
with its fp32 weights and Adam moments) into ``universal/`` inside the step folder, which an engine built with
``checkpoint.load_universal`` then loads at any world size (DeepSpeed's "universal checkpoint",
https://www.deepspeed.ai/tutorials/universal-checkpointing/). Nothing else differs: the schedule position
sits in DeepSpeed's model-states file, which the conversion copies.

RNG states (Python, NumPy, torch CPU, every CUDA device) are stored as JSON (torch states as base64)
so that nothing is ever unpickled on load.

Damage after the fact (a disk that filled up, a file truncated or deleted by hand) is found before any
process loads anything: :func:`checkpoint_problem` checks that the state parses, that ``model.safetensors``
is exactly as long as its header says, and that every ``.pt`` file (``optimizer.pt``, DeepSpeed's states)
is a whole zip archive; it reads headers and sizes only, never the tensors. ``--resume auto`` (and a
``--resume`` given a run or checkpoints folder) then falls back to the newest complete checkpoint, logging
what it skipped and why; with no complete one left it refuses rather than silently start afresh. A
checkpoint folder named explicitly is refused with the same diagnosis. A file damaged in place without a
change of length is not detected here; loading it then fails or, for raw tensor bytes, cannot know.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmtok.hub import CheckpointError, _fsync_dir, atomic_write_text
from mmtok.train.ema import EMA_NAME

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


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be loaded whole (missing, cut short, bad header), or None."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path.name} is truncated inside its header ({size} bytes, header of {n})"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:  # ValueError covers JSON and UTF-8 errors
        return f"{path.name} has an unreadable header ({type(e).__name__}: {e})"
    if not isinstance(header, dict):
        return f"{path.name} has a malformed header"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return f"{path.name} has a malformed header"
    if 8 + n + end != size:  # safetensors requires the data to end exactly at the file's end
        return f"{path.name} is truncated or padded ({size} bytes, its header describes {8 + n + end})"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """Why a ``torch.save`` file cannot be loaded (missing, not a whole zip archive), or None.

    ``torch.save`` writes a zip archive whose directory sits at the end of the file, so a truncated file
    has none; the directory's entries must also lie inside the file.
    """
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"{path.name} is truncated ({size} bytes; member {info.filename} ends past it)"
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        return f"{path.name} is truncated or not a torch.save archive ({size} bytes: {e})"
    return None


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """What makes ``folder`` unusable for a resume, or None when it is complete.

    Checks (headers and sizes only, no tensor is read): ``trainer_state.json`` parses and has a step;
    ``model.safetensors`` is whole; without DeepSpeed ``optimizer.pt`` is a whole archive; with DeepSpeed its
    model states exist, its optimizer states (if any) number one per rank, and every ``.pt`` is whole.
    """
    folder = Path(folder)
    try:
        state = json.loads((folder / STATE_NAME).read_text())
    except FileNotFoundError:
        return f"{STATE_NAME} is missing"
    except (OSError, ValueError) as e:
        return f"{STATE_NAME} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{STATE_NAME} has no step"
    problem = _safetensors_problem(folder / MODEL_NAME)
    if problem:
        return problem
    if "ema_updates" in state:  # train.ema_decay: the weight average is part of the resume
        problem = _safetensors_problem(folder / EMA_NAME)
        if problem:
            return problem
    if state.get("backend") == "deepspeed":
        files = sorted(folder.glob("*.pt"))
        if not any(f.name.endswith("model_states.pt") for f in files):
            return "DeepSpeed's model states (*model_states.pt) are missing"
        optim = [f for f in files if f.name.endswith("optim_states.pt")]
        ranks = state.get("world_size")
        if optim and isinstance(ranks, int) and len(optim) != ranks:
            return f"{len(optim)} DeepSpeed optimizer state files for {ranks} ranks"
    else:
        files = [folder / OPTIM_NAME]
    for f in files:
        problem = _torch_file_problem(f)
        if problem:
            return problem
    return None


def find_latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint: the ``latest`` pointer if valid, else the highest step folder.

    Folders that :func:`checkpoint_problem` finds damaged are skipped with a warning naming each one and
    what is wrong with it.
    """
    root = Path(root)
    pointer = root / LATEST_NAME
    target = None
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / STATE_NAME).is_file() and checkpoint_problem(target) is None:
            return target
    skipped = []
    for cand in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(cand)
        if problem is None:
            if skipped or target is not None:
                logger.warning("using checkpoint %s%s", cand, _skipped_text(skipped, target))
            return cand
        skipped.append((cand, problem))
    if target is not None and not skipped:
        logger.warning("%s points to %s, which is not a complete checkpoint, and there is no other", pointer, target)
    return None


def _skipped_text(skipped: list[tuple[Path, str]], target: Path | None) -> str:
    parts = [f"{p.name} ({why})" for p, why in skipped]
    if target is not None and not (target / STATE_NAME).is_file() and all(p != target for p, _ in skipped):
        parts.append(f"{target.name} named by {LATEST_NAME} (not a complete checkpoint)")
    return ", skipping the newer damaged " + "; ".join(parts) if parts else ""


def damaged_checkpoints(root: str | os.PathLike) -> list[tuple[Path, str]]:
    """``(folder, problem)`` of every checkpoint folder under ``root`` that is not usable, oldest first."""
    return [(p, why) for p in list_checkpoints(root) if (why := checkpoint_problem(p)) is not None]


def resolve_resume(resume: str, root: str | os.PathLike) -> Path | None:
    """Turn ``--resume auto|never|PATH`` into a checkpoint folder (or None to start fresh)."""
    if resume in ("never", "no", "none", "", None):
        return None
    if resume == "auto":
        latest = find_latest(root)
        if latest is None and (damaged := damaged_checkpoints(root)):
            raise CheckpointError(_all_damaged(root, damaged))
        return latest
    path = Path(resume)
    if path.is_dir() and not (path / STATE_NAME).is_file():
        latest = find_latest(path)  # a checkpoints/ folder or a run folder
        latest = latest or find_latest(path / "checkpoints")
        if latest is None:
            damaged = damaged_checkpoints(path) or damaged_checkpoints(path / "checkpoints")
            if damaged:
                raise CheckpointError(_all_damaged(path, damaged))
            raise CheckpointError(f"--resume {path}: no complete checkpoint (step-XXXXXXXX/{STATE_NAME}) in it")
        return latest
    if not (path / STATE_NAME).is_file():
        raise CheckpointError(f"--resume {path}: not a checkpoint folder (no {STATE_NAME}); pass auto, never or a path")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(
            f"--resume {path}: the checkpoint is damaged ({problem}); pass an older checkpoint folder, or the run "
            "folder to use the newest complete one"
        )
    return path


def _all_damaged(root: str | os.PathLike, damaged: list[tuple[Path, str]]) -> str:
    listed = "; ".join(f"{p.name}: {why}" for p, why in reversed(damaged))
    return (
        f"no complete checkpoint under {root} to resume from (damaged: {listed}); restore the files, or pass "
        "--resume never to start afresh (keep a copy of the folder: new checkpoints replace these)"
    )


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


# -- another world size (DeepSpeed) -----------------------------------------------------------------
UNIVERSAL_NAME = "universal"


def ensure_universal(folder: Path) -> Path:
    """The universal form of the DeepSpeed checkpoint in ``folder`` (converted on the first call; rank 0 only).

    The conversion runs DeepSpeed's ``deepspeed.checkpoint.ds_to_universal`` in this process (no worker
    processes) into a temporary sibling folder that is renamed into place when complete, so a process killed
    mid-way leaves no half-made ``universal/``. Its console output goes to the log at DEBUG level.

    Args:
        folder: A complete ``step-XXXXXXXX`` folder written by a DeepSpeed run (ZeRO stage 1, 2 or 3).

    Returns:
        ``folder / "universal"``, loadable with ``engine.load_checkpoint(folder, tag="universal")`` by an engine
        whose config has ``"checkpoint": {"load_universal": true}``.

    Raises:
        CheckpointError: the folder holds no ZeRO optimizer states, or DeepSpeed's conversion failed.
    """
    import argparse
    import contextlib
    import io

    target = folder / UNIVERSAL_NAME
    if target.is_dir():
        logger.info("using the universal checkpoint %s made earlier", target)
        return target
    if not any(folder.glob("*optim_states.pt")):
        raise CheckpointError(
            f"{folder} has no ZeRO optimizer states (*optim_states.pt), so it cannot be converted to a universal "
            "checkpoint; resume it with the number of processes that wrote it"
        )
    from deepspeed.checkpoint import ds_to_universal

    tmp = folder / f".{UNIVERSAL_NAME}-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(folder),
        output_folder=str(tmp),
        num_extract_workers=1,  # 1 = in this process (no process pool)
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # DeepSpeed's engine records no UNIVERSAL_CHECKPOINT_INFO for a plain module (Megatron does): the
        # converter adds the version entry, all that a model without tensor or pipeline parallelism needs.
        inject_missing_state=True,
    )
    logger.info("converting %s to a DeepSpeed universal checkpoint (world size changed)", folder)
    console = io.StringIO()
    try:
        with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
            ds_to_universal.main(args)
    except Exception as e:  # noqa: BLE001 - whatever DeepSpeed raises, the user gets one message and the log
        shutil.rmtree(tmp, ignore_errors=True)
        logger.debug("ds_to_universal output:\n%s", console.getvalue())
        raise CheckpointError(
            f"DeepSpeed could not convert {folder} to a universal checkpoint ({type(e).__name__}: {e}); resume "
            "it with the number of processes that wrote it"
        ) from e
    logger.debug("ds_to_universal output:\n%s", console.getvalue())
    (folder / "latest_universal").unlink(missing_ok=True)  # written by the converter beside its output; unused
    _fsync_dir(tmp)
    os.replace(tmp, target)
    _fsync_dir(folder)
    return target


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

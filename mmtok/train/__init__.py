"""mmtok's training engine: one loop around a Task, single process, DDP or DeepSpeed ZeRO 1/2/3.

Public API (imported lazily so ``import mmtok.train`` stays cheap)::

    train(cfg: RunConfig, resume="auto") -> dict        # mmtok.train.engine
    preflight(cfg: RunConfig) -> None                  # mmtok.train.engine (bad input, before any run folder)
    Task                                               # mmtok.train.task (the contract)
    evaluate_run(run_dir, ...) -> dict                 # mmtok.train.evaluate (`mmtok eval run`)
    RunConfig, load_run_config(files, overrides)       # mmtok.train.config (the run schema and its loader)
"""

from __future__ import annotations

from mmtok.lazy import lazy_exports

_LAZY = {
    "train": "mmtok.train.engine",
    "preflight": "mmtok.train.engine",
    "Task": "mmtok.train.task",
    "evaluate_run": "mmtok.train.evaluate",
    "OptimConfig": "mmtok.train.config",
    "TrainConfig": "mmtok.train.config",
    "DeepSpeedConfig": "mmtok.train.config",
    "RunConfig": "mmtok.train.config",
    "load_run_config": "mmtok.train.config",
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

"""Run logs: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard scalars (rank 0 only).

On resume, lines written after the checkpoint by the interrupted process are dropped and TensorBoard
is opened with ``purge_step``, so both logs read like one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Append-only metric log. A no-op on ranks other than 0 (``enabled=False``).

    Args:
        out_dir: The run folder.
        enabled: False on non-zero ranks.
        tensorboard: Also write TensorBoard event files under ``out_dir/tb``.
        resume_step: Drop JSON lines with ``step > resume_step`` and purge later TensorBoard events
            (None = fresh run: start a new metrics.jsonl).
    """

    def __init__(self, out_dir: Path, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.is_file():
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and _step_of(ln) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tb"), purge_step=purge)
            except ImportError as e:  # tensorboard is a dependency, but a broken install should not stop training
                logger.warning("TensorBoard logging off: %s", e)

    def log(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        """Write ``values`` (floats) at ``step``; keys are prefixed in TensorBoard (``train/loss``)."""
        if not self.enabled:
            return
        row = {"step": step, **({"split": prefix} if prefix != "train" else {})}
        row.update({k: _clean(v) for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # a torn last line from a killed process: drop it


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """Parse a run's metrics.jsonl."""
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []

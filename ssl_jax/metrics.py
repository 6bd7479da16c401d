"""Training metrics: one JSON object per logged step in ``DIR/metrics.jsonl`` and TensorBoard
event files in ``DIR`` (written by tensorboardX, no TensorFlow needed). Only process 0 writes."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import jax
from etils import epath


class MetricsWriter:
    def __init__(self, workdir: epath.PathLike, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(workdir), flush_secs=30)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _finite_or_str(float(v)) for k, v in scalars.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in scalars.items():
            self._tb.add_scalar(key, float(value), global_step=int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _finite_or_str(value: float) -> float | str:
    """JSON has no NaN/Inf: write them as strings so the file stays valid JSON."""
    return value if math.isfinite(value) else str(value)

"""What the jobs write about a run: training metrics, one JSON object per logged step in
``DIR/metrics.jsonl``, and TensorBoard event files in ``DIR`` (written by tensorboardX, no
TensorFlow needed), only from process 0; and the evaluation jobs' results files
(:func:`update_results`).

A workdir on an object store (``gs://...``, through etils' epath) cannot be appended to: there
the file is rewritten whole at each write, rows of earlier invocations included (a few hundred
KB for a long run). TensorBoard files on ``gs://`` need ``google-cloud-storage`` (tensorboardX).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging
from etils import epath


class MetricsWriter:
    def __init__(self, workdir: epath.PathLike, enabled: bool | None = None,
                 tensorboard: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._appendable = "://" not in os.fspath(self.path)  # a local file system
        self._rows: list[str] | None = None  # an object store's whole file
        self._tb = None
        if self.enabled and tensorboard:
            if self._appendable or importlib.util.find_spec("google.cloud.storage") is not None:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(logdir=str(workdir), flush_secs=30)
            else:
                logging.warning("no TensorBoard files in %s: pip install google-cloud-storage "
                                "for them (metrics.jsonl is written)", workdir)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _finite_or_str(float(v)) for k, v in scalars.items()})
        line = json.dumps(row) + "\n"
        if self._appendable:
            with self.path.open("a") as f:
                f.write(line)
        else:
            if self._rows is None:
                self._rows = [self.path.read_text()] if self.path.exists() else []
            self._rows.append(line)
            self.path.write_text("".join(self._rows))
        for key, value in scalars.items() if self._tb is not None else ():
            self._tb.add_scalar(key, float(value), global_step=int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _finite_or_str(value: float) -> float | str:
    """JSON has no NaN/Inf: write them as strings so the file stays valid JSON."""
    return value if math.isfinite(value) else str(value)


def update_results(path: epath.PathLike, entries: Mapping[str, Any]) -> dict[str, Any]:
    """Sets ``entries`` in the JSON object at ``path`` (the evaluation job's ``eval.json``, the
    fine-tuning job's ``finetune.json``) and returns the whole object; the other keys are kept.
    The file is replaced at once (a temporary file renamed over it), so a failed write (an
    ``OSError`` is raised) leaves the earlier file as it was. A file that is not a JSON object
    is kept aside as ``*.unreadable-<time>.json`` and a new one started."""
    path = epath.Path(path)
    results: dict[str, Any] = {}
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except json.JSONDecodeError:
            existing = None
        if isinstance(existing, dict):
            results = existing
        else:
            backup = path.with_suffix(f".unreadable-{int(time.time())}.json")
            path.rename(backup)
            logging.warning("%s was not a JSON object; kept it as %s", path, backup)
    results.update(entries)
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    tmp.replace(path)
    return results

"""The step loop shared by pre-training (:mod:`ssl_jax.train`) and fine-tuning
(:mod:`ssl_jax.finetuning.job`): data iterator -> jitted step -> logging -> checkpoint save ->
preemption -> non-finite check. Each job brings its own state, step function and loader; the
loop knows neither.

The state is a dict with at least ``step`` and ``nonfinite_steps`` (int32 scalars); the step
function maps ``(state, global batch) -> (state, metrics)`` with scalar ``loss``, ``grad_norm``
and ``lr`` among the metrics, and leaves the state unchanged (but for ``step`` and the count
``nonfinite_steps``) when the loss or gradient is not finite.

Faults (exit codes in :mod:`ssl_jax.faults`):

- Preemption: on SIGTERM (single process, seen by the caller's
  :class:`~ssl_jax.faults.PreemptionWatcher`) or at the step that JAX's preemption sync manager
  agrees on (multi-process, via ``RunCheckpoints.reached_preemption``), the loop finishes the
  current step, saves its checkpoint (state and data position), waits for the save to complete
  and raises :class:`~ssl_jax.faults.Preempted` (exit code 75). SIGTERM before the first step
  raises at once (there is nothing new to save); at the last step the run just completes.
- Non-finite loss or gradient: ``on_nonfinite='skip'`` counts the skipped steps
  (``nonfinite_steps`` in metrics.jsonl, a warning at log steps) and goes on;
  ``on_nonfinite='stop'`` raises :class:`~ssl_jax.faults.NonFiniteError` naming the step (exit
  code 4). It checks each step's loss and gradient norm on the host one step late (one step stays
  in flight) and the step itself before every save: no checkpoint is written once a non-finite
  step happened, the older ones are kept, and a restart resumes from the newest.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import faults, flops, parallel
from ssl_jax.metrics import MetricsWriter


def run_steps(
    *,
    state: dict[str, Any],
    step_fn: Callable[[Any, Any], tuple[Any, dict[str, Any]]],
    data_iter: Iterator[dict[str, np.ndarray]],
    mesh: Mesh,
    checkpoints: ckpt_lib.RunCheckpoints,
    writer: MetricsWriter,
    preemption: faults.PreemptionWatcher,
    start_step: int,
    last_step: int,
    total_steps: int,
    steps_per_epoch: int,
    batch_size: int,
    log_every: int,
    checkpoint_every: int,
    on_nonfinite: str,
    to_batch: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    peak_flops: float = math.nan,
    log_lines: bool = False,
) -> dict[str, Any]:
    """Runs steps ``start_step + 1 .. last_step`` (of ``total_steps`` in the whole run) and
    returns the state after the last one.

    Each step assembles the global batch from ``next(data_iter)`` (every field the data declares;
    ``to_batch``, if given, maps it first), runs ``step_fn``
    and, every ``log_every`` steps and at the last, writes the metrics (plus ``images_per_sec``,
    ``mfu`` when ``step_fn`` knows its FLOPs (:class:`ssl_jax.flops.CountedStep`),
    ``nonfinite_steps`` and ``epoch``) to ``writer`` and the progress bar (``log_lines``: also a
    log line). A checkpoint (state and ``data_iter``'s position) is saved every
    ``checkpoint_every`` steps, at ``last_step`` and at a preemption. Raises
    :class:`~ssl_jax.faults.Preempted` after saving for a preemption and
    :class:`~ssl_jax.faults.NonFiniteError` (``on_nonfinite='stop'``). Waits for the saves and
    closes ``writer`` before returning; ``checkpoints`` stays open."""
    progress = progress_bar(total_steps, start_step)
    last_time, last_step_logged = time.perf_counter(), start_step
    first_step_s = math.nan
    nonfinite_seen = int(state["nonfinite_steps"])  # those of earlier invocations
    stop_on_nonfinite, previous = on_nonfinite == "stop", None
    if preemption.signalled():
        _stop_preempted(checkpoints, writer, start_step, saved=False)
    for step in range(start_step + 1, last_step + 1):
        batch = next(data_iter)
        batch = parallel.global_batch(to_batch(batch) if to_batch else batch, mesh)
        state, metrics = step_fn(state, batch)
        if stop_on_nonfinite and previous is not None:  # the step before, one step late
            check_finite(step - 1, previous, checkpoints)
        previous = metrics
        if step == start_step + 1:  # Time compilation apart so images/s measures the steps.
            jax.block_until_ready(state)
            first_step_s = time.perf_counter() - last_time
            logging.info("first step, compilation included: %.1f s", first_step_s)
            last_time, last_step_logged = time.perf_counter(), step
        if step % log_every == 0 or step == last_step:
            metrics = jax.device_get(metrics)
            nonfinite = int(state["nonfinite_steps"])
            now = time.perf_counter()
            metrics["images_per_sec"] = (
                batch_size * (step - last_step_logged) / (now - last_time)
                if step > last_step_logged else batch_size / first_step_s)
            metrics.update(flops.mfu_metric(getattr(step_fn, "flops", math.nan),
                                            metrics["images_per_sec"] / batch_size, peak_flops))
            metrics["nonfinite_steps"] = nonfinite
            metrics["epoch"] = step / steps_per_epoch
            writer.write(step, metrics)
            progress.update(step - progress.n)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}",
                                 img_s=f"{metrics['images_per_sec']:.0f}")
            if log_lines:
                logging.info("step %d/%d: loss %.4f, lr %.3g", step, total_steps,
                             float(metrics["loss"]), float(metrics["lr"]))
            last_time, last_step_logged = now, step
            if nonfinite > nonfinite_seen:
                logging.warning("%d non-finite step(s) skipped up to step %d", nonfinite, step)
                nonfinite_seen = nonfinite
        # Every process asks at every step (the multi-host sync point requires it).
        preempted = (preemption.reached(step, checkpoints.reached_preemption)
                     and step < last_step)
        if preempted or step % checkpoint_every == 0 or step == last_step:
            if stop_on_nonfinite:  # never save a state once a non-finite step happened
                check_finite(step, metrics, checkpoints)
            checkpoints.save(step, state, data_iter)
        if preempted:
            progress.close()
            _stop_preempted(checkpoints, writer, step, saved=True)
    progress.close()
    checkpoints.wait()
    writer.close()
    return state


def check_finite(step: int, metrics: dict[str, Any],
                 checkpoints: ckpt_lib.RunCheckpoints) -> None:
    """Raises :class:`~ssl_jax.faults.NonFiniteError` naming ``step`` if its loss or gradient
    norm is not finite (a host sync on the two scalars)."""
    loss, grad_norm = (float(v) for v in jax.device_get((metrics["loss"], metrics["grad_norm"])))
    if np.isfinite(loss) and np.isfinite(grad_norm):
        return
    checkpoints.wait()
    latest = checkpoints.latest_step()
    kept = (f"the last good checkpoint is step {latest} in {checkpoints.directory}; the same "
            "command resumes from it" if latest is not None else "no checkpoint was saved")
    raise faults.NonFiniteError(
        f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step} with "
        f"on_nonfinite='stop'; {kept}. Lower the learning rate (--config.optim.base_lr) or "
        "check the data, or pass --config.on_nonfinite=skip to skip such steps.")


def _stop_preempted(checkpoints: ckpt_lib.RunCheckpoints, writer: MetricsWriter, step: int,
                    saved: bool) -> None:
    """Waits for the checkpoint of ``step`` to be complete, then raises ``Preempted``."""
    checkpoints.close()  # waits for the save in flight
    writer.close()
    if saved:
        what = f"saved the checkpoint of step {step}"
    else:
        latest = checkpoints.latest_step()
        what = "before the first step; " + (
            f"the newest checkpoint is step {latest}" if latest is not None else "no checkpoint")
    message = (f"preempted: {what} in {checkpoints.directory}; run the same command to resume "
               f"(exit code {faults.EXIT_PREEMPTED})")
    raise faults.Preempted(step, message)


def progress_bar(total: int, initial: int):
    """A tqdm bar over the steps, shown only on a terminal."""
    import tqdm

    return tqdm.tqdm(total=total, initial=initial, disable=not sys.stdout.isatty(),
                     unit="step", dynamic_ncols=True)

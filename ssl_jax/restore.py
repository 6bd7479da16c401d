"""Read a run back: its config, its method, its state's layout, a checkpoint's state, read-only.

This module sits above both the method layer and :mod:`ssl_jax.checkpoint` (which knows no
method): it is what the jobs that only *read* a run use (evaluation, fine-tuning, the pictures),
and what BEiT uses to load its frozen dVAE tokenizer from another run. Nothing here creates an
Orbax ``CheckpointManager`` (Orbax documents it as unsafe for jobs running beside the training
job that writes the run): a step directory is restored with a plain ``Checkpointer``
(:func:`ssl_jax.checkpoint.restore_step`), with the training job's fall-back: an unreadable or
corrupt newest checkpoint is skipped with a warning (kept where it is), an older good one is
used, and no readable checkpoint at all is a :class:`~ssl_jax.checkpoint.WorkdirError`.

    config = restore.load_run_config(workdir)
    method, state, step = restore.restore_state(workdir, config, mesh)       # latest good one
    config, method, state, step = restore.restore_run(workdir, mesh, step=3)  # config too
"""

from __future__ import annotations

from typing import Any

import ml_collections
from etils import epath
from jax.sharding import Mesh

from ssl_jax import checkpoint, methods
from ssl_jax.checkpoint import WorkdirError, load_run_config
from ssl_jax.step import build_state

__all__ = ["WorkdirError", "abstract_state", "create_method", "load_run_config",
           "restore_run", "restore_state"]


def create_method(config: ml_collections.ConfigDict, mesh: Mesh | None) -> Any:
    """The run's method object, as the trainer builds it (schedules of length 1: a restore
    needs only the state's layout)."""
    return methods.create(config, mesh)


def abstract_state(config: ml_collections.ConfigDict, mesh: Mesh, method: Any) -> Any:
    """The train state's layout ``{step, params, extra, opt_state, nonfinite_steps}`` as
    ``jax.ShapeDtypeStruct`` leaves with their shardings on ``mesh``: what a restore fills."""
    return build_state(config, mesh, method, total_steps=1, steps_per_epoch=1).abstract


def checkpoint_steps(workdir: epath.PathLike) -> list[int]:
    """The steps of the run's complete checkpoints, oldest first (reads only the listing)."""
    return checkpoint.ReadOnlyCheckpoints(workdir).all_steps()


def restore_state(
    workdir: epath.PathLike, config: ml_collections.ConfigDict, mesh: Mesh, step: int = -1
) -> tuple[Any, dict[str, Any], int]:
    """``(method, train_state, step)``: the whole state (params, extra, optimizer) of the
    checkpoint ``step`` of the run in ``workdir`` (-1: the newest readable one), built for
    ``config`` (the run's own, possibly with overrides that keep the state's layout) on
    ``mesh``. Read-only: nothing in ``workdir`` is written, moved or locked.

    Raises:
      WorkdirError: no checkpoint, no checkpoint of ``step`` (naming the available ones), or
        none that restores.
      CorruptCheckpointError / Orbax's errors: the explicitly requested ``step`` is unreadable.
    """
    checkpoints = checkpoint.ReadOnlyCheckpoints(workdir)
    steps = checkpoints.all_steps()
    if not steps:
        raise WorkdirError(
            f"no checkpoint in {checkpoints.directory}: train first with "
            f"python -m ssl_jax.train --config ... --workdir {workdir}")
    if step >= 0 and step not in steps:
        raise WorkdirError(
            f"no checkpoint of step {step} in {checkpoints.directory}; available steps: {steps} "
            "(or --config.eval.step=-1 for the latest)")
    method = create_method(config, mesh)
    abstract = abstract_state(config, mesh, method)
    if step >= 0:
        state = checkpoints.restore(step, abstract)
    else:
        step, state = checkpoints.restore_latest_good(abstract)
        if state is None:
            raise WorkdirError(f"no readable checkpoint in {checkpoints.directory}")
    return method, state, step


def restore_run(
    workdir: epath.PathLike, mesh: Mesh, step: int = -1
) -> tuple[ml_collections.ConfigDict, Any, dict[str, Any], int]:
    """``(config, method, train_state, step)`` of the run in ``workdir`` with its own saved
    config (see :func:`restore_state`)."""
    config = load_run_config(workdir)
    return (config, *restore_state(workdir, config, mesh, step))

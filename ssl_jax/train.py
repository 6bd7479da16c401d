r"""The one pre-training loop. It knows no method by name.

    python -m ssl_jax.train --config configs/simclr.py:data=digits --workdir /tmp/run \
        [--config.batch_size=512 ...]

Re-running with the same workdir resumes from its newest good checkpoint, data position
included. Sections: set-up, data, method and optimizer, state (created sharded), the step,
the loop (:func:`ssl_jax.loop.run_steps`, shared with fine-tuning: logging, checkpoints,
preemption, non-finite steps), export. ``--config.init_from=PATH`` (a weights file or a run
directory) starts a new run from those weights (:mod:`ssl_jax.convert.init_from`); a resumed run
takes its state from its checkpoint.

Faults (exit codes in :mod:`ssl_jax.faults`):

- Preemption: on SIGTERM (single process; a handler installed for the duration of
  :func:`train` only) or at the step that JAX's preemption sync manager agrees on (multi-process,
  via Orbax's ``CheckpointManager.reached_preemption``), the run finishes the current step,
  saves its checkpoint (state and data position), waits for the save to complete and raises
  :class:`~ssl_jax.faults.Preempted`: exit code 75 (``EXIT_PREEMPTED``). The same command
  resumes exactly where it stopped. SIGTERM before the first step exits with 75 at once (there
  is nothing new to save); at the last step the run just completes (exit code 0).
- SIGKILL at any moment: the next start resumes from the newest complete checkpoint; an
  interrupted save is discarded. Resumed runs equal uninterrupted ones bit for bit on CPU.
- Corrupt checkpoints: see :mod:`ssl_jax.checkpoint` (warn, fall back, move aside).
- Non-finite loss or gradient: the step is skipped, leaving the state as it was (see
  :func:`ssl_jax.step.make_train_step`); ``on_nonfinite='skip'`` counts it
  (``nonfinite_steps`` in metrics.jsonl, a warning at log steps) and goes on.
  ``on_nonfinite='stop'`` raises :class:`~ssl_jax.faults.NonFiniteError` naming the step (exit
  code 4). It checks each step's loss and gradient norm on the host one step late, so one
  step stays in flight and the host syncs on a scalar pair per step, and it checks the
  step itself before every save: no checkpoint is written once a non-finite step happened,
  the older ones are kept, and a restart resumes from the newest.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from ssl_jax import allocator, faults, flops, loop, methods, online_probe, parallel
from ssl_jax import checkpoint as ckpt_lib
from ssl_jax.config import ConfigError, require
from ssl_jax.data import pipeline
from ssl_jax.metrics import MetricsWriter
from ssl_jax.step import build_state, make_train_step

NonFiniteError = faults.NonFiniteError


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks the trainer's own keys before anything compiles."""
    require(config.batch_size > 0, "batch_size", "must be > 0")
    require(config.num_epochs > 0 or config.total_steps > 0, "num_epochs",
            "set num_epochs or total_steps to a positive number")
    require(config.log_every > 0, "log_every", "must be > 0")
    require(config.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be > 0")
    require(config.on_nonfinite in ("skip", "stop"), "on_nonfinite", "must be 'skip' or 'stop'")
    online_probe.check_config(config)


def train(
    config: ml_collections.ConfigDict, workdir: str, stop_at_step: int = 0
) -> dict[str, Any]:
    """Pre-trains per ``config`` in ``workdir`` (resuming if it holds a checkpoint).

    ``stop_at_step`` > 0 ends this invocation after that step with a checkpoint, without
    changing the run (schedules keep the full length); a later call resumes. Returns the
    state (on the devices) for programmatic use and tests. Raises
    :class:`~ssl_jax.faults.Preempted` after saving for a preemption notice and
    :class:`~ssl_jax.faults.NonFiniteError` (``on_nonfinite='stop'``)."""
    with faults.PreemptionWatcher() as preemption:
        return _train(config, workdir, stop_at_step, preemption)


def _train(
    config: ml_collections.ConfigDict, workdir: str, stop_at_step: int,
    preemption: faults.PreemptionWatcher,
) -> dict[str, Any]:
    # --- Set-up -----------------------------------------------------------------------------
    check_config(config)
    workdir = ckpt_lib.workdir_path(workdir)
    mesh = parallel.make_mesh(config.mesh.fsdp)
    parallel.check_global_batch(config.batch_size, mesh)
    logging.info("mesh %s over %d process(es)", dict(mesh.shape), jax.process_count())
    if (malloc_hint := allocator.hint(jax.default_backend())) is not None:
        logging.warning(malloc_hint)

    # --- Data ---------------------------------------------------------------------------------
    loader = pipeline.train_loader(
        config.data, global_batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    data_iter = iter(loader)
    num_train = pipeline.num_examples(config.data, config.data.train_split)
    steps_per_epoch = max(num_train // config.batch_size, 1)
    total_steps = config.total_steps or int(config.num_epochs * steps_per_epoch)

    # --- Method, optimizer, state ---------------------------------------------------------------
    method = methods.create(config, mesh, total_steps=total_steps,
                            steps_per_epoch=steps_per_epoch)
    setup = build_state(config, mesh, method, total_steps, steps_per_epoch)
    schedule, tx, shardings = setup.schedule, setup.tx, setup.shardings
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    init_source = _init_source(config, workdir, method, setup.abstract, mesh)
    # Only now that data, method, optimizer and init_from accept the config does the workdir
    # get written.
    ckpt_lib.check_workdir(workdir, config)

    checkpoints = ckpt_lib.RunCheckpoints(
        workdir, keep=config.checkpoint.keep, keep_every=config.checkpoint.keep_every,
        async_save=config.checkpoint.async_save)
    start_step, state = checkpoints.restore_latest_good(setup.abstract, data_iter)
    if state is None:
        state = jax.jit(setup.init_state, out_shardings=shardings)(init_rng)
        start_step = 0
        logging.info("initialised a new run in %s", workdir)
        if init_source is not None:
            state = init_source.apply(state, method, mesh)
            logging.info("weights from %s: %s", config.init_from, "; ".join(init_source.notes))
    else:
        logging.info("resumed %s from step %d", workdir, start_step)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
    logging.info("%d trainable parameters; %d steps (%d per epoch)", n_params, total_steps,
                 steps_per_epoch)

    # --- The step -------------------------------------------------------------------------------
    step_fn = flops.CountedStep(jax.jit(  # compiled at the first call; knows its FLOPs
        make_train_step(method, tx, schedule, step_rng, config.on_nonfinite, setup.probe),
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    ))
    # Measured once per process and compute dtype, for the 'mfu' metric.
    peak_flops = flops.peak_flops(config.model.get("dtype", "float32"))

    # --- The loop (shared with fine-tuning: ssl_jax.loop) ------------------------------------
    last = min(total_steps, stop_at_step) if stop_at_step > 0 else total_steps
    state = loop.run_steps(
        state=state, step_fn=step_fn, data_iter=data_iter, mesh=mesh, checkpoints=checkpoints,
        writer=MetricsWriter(workdir), preemption=preemption,
        start_step=start_step, last_step=last, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, batch_size=config.batch_size,
        log_every=config.log_every, checkpoint_every=config.checkpoint.every_steps,
        on_nonfinite=config.on_nonfinite, peak_flops=peak_flops)

    # --- Export ---------------------------------------------------------------------------------
    final_step = int(state["step"])
    if final_step == total_steps:
        target = ckpt_lib.export_encoder(
            workdir, final_step, method.encoder_variables(state["params"], state["extra"]),
            config)
        logging.info("exported the encoder of step %d to %s", final_step, target)
    checkpoints.close()
    return state


def _init_source(config: ml_collections.ConfigDict, workdir: Any, method: Any, abstract: Any,
                 mesh: Any) -> Any:
    """The weights ``config.init_from`` names, read and checked against the state's layout
    (:func:`ssl_jax.convert.init_from.prepare`), when the run starts afresh; None when it has
    none or resumes (its checkpoint holds the state). A workdir that holds imported weights is
    not trained in (it has no data position): a WorkdirError says to start from it."""
    from ssl_jax.convert import init_from

    if (workdir / init_from.IMPORTED_MARKER).exists():
        raise ckpt_lib.WorkdirError(
            f"{workdir} holds imported weights (python -m ssl_jax.convert import), which are "
            f"evaluated and fine-tuned in place; to pre-train from them use a new --workdir with "
            f"--config.init_from={workdir}")
    path = config.get("init_from", "")
    if not path or ckpt_lib.checkpoint_steps(workdir / "checkpoints"):
        return None
    if os.path.abspath(path) == os.path.abspath(os.fspath(workdir)):
        raise ConfigError(f"config.init_from={path!r} is the run's own --workdir; name another "
                          "run or a weights file")
    return init_from.prepare(path, method, abstract, mesh)


def define_flags() -> None:
    """The command line of ``python -m ssl_jax.train`` (defined only when run as a program)."""
    config_flags.DEFINE_config_file("config", None, "Training config file.")
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
    flags.DEFINE_string("coordinator_address", "", "host:port of process 0.")
    flags.DEFINE_integer("num_processes", 0, "Processes in a multi-host run.")
    flags.DEFINE_integer("process_id", -1, "This process's index.")
    flags.DEFINE_integer("stop_at_step", 0, "End this invocation after this step (with a "
                         "checkpoint); the run resumes from there when started again.")
    flags.DEFINE_bool("model_from_init", False, "Set config.model to the encoder of what "
                      "--config.init_from names (a run's model, a weights file's architecture).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise flags.Error(f"unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    if args.config is None or args.workdir is None:
        raise flags.Error("--config and --workdir are required")
    if args.model_from_init:
        from ssl_jax.convert import run_dir

        logging.info("model from %s: %s", args.config.init_from,
                     run_dir.model_from_init(args.config))
    train(args.config, args.workdir, args.stop_at_step)


if __name__ == "__main__":
    from ssl_jax import cli

    define_flags()
    cli.run(main)

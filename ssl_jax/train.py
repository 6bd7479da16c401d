r"""The one pre-training loop. It knows no method by name.

    python -m ssl_jax.train --config configs/simclr.py:data=digits --workdir /tmp/run \
        [--config.batch_size=512 ...]

Re-running with the same workdir resumes from its newest good checkpoint, data position
included. Sections: set-up, data, method and optimizer, state (created sharded), the step,
the loop (logging, checkpoints), export.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import methods, parallel
from ssl_jax.config import require
from ssl_jax.data import pipeline
from ssl_jax.metrics import MetricsWriter
from ssl_jax.step import build_state, make_train_step


class NonFiniteError(RuntimeError):
    """Training produced a NaN or Inf loss or gradient and ``on_nonfinite='stop'``."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks the trainer's own keys before anything compiles."""
    require(config.batch_size > 0, "batch_size", "must be > 0")
    require(config.num_epochs > 0 or config.total_steps > 0, "num_epochs",
            "set num_epochs or total_steps to a positive number")
    require(config.log_every > 0, "log_every", "must be > 0")
    require(config.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be > 0")
    require(config.on_nonfinite in ("skip", "stop"), "on_nonfinite", "must be 'skip' or 'stop'")


def train(
    config: ml_collections.ConfigDict, workdir: str, stop_at_step: int = 0
) -> dict[str, Any]:
    """Pre-trains per ``config`` in ``workdir`` (resuming if it holds a checkpoint).

    ``stop_at_step`` > 0 ends this invocation after that step with a checkpoint, without
    changing the run (schedules keep the full length); a later call resumes. Returns the
    state (on the devices) for programmatic use and tests."""
    # --- Set-up -----------------------------------------------------------------------------
    check_config(config)
    workdir = ckpt_lib.workdir_path(workdir)
    mesh = parallel.make_mesh(config.mesh.fsdp)
    parallel.check_global_batch(config.batch_size, mesh)
    logging.info("mesh %s over %d process(es)", dict(mesh.shape), jax.process_count())

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
    method = methods.create(config, mesh, total_steps, steps_per_epoch)
    setup = build_state(config, mesh, method, total_steps, steps_per_epoch)
    schedule, tx, shardings = setup.schedule, setup.tx, setup.shardings
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    # Only now that data, method and optimizer accept the config does the workdir get written.
    ckpt_lib.check_workdir(workdir, config)

    checkpoints = ckpt_lib.RunCheckpoints(
        workdir, keep=config.checkpoint.keep, keep_every=config.checkpoint.keep_every,
        async_save=config.checkpoint.async_save)
    start_step, state = checkpoints.restore_latest_good(setup.abstract, data_iter)
    if state is None:
        state = jax.jit(setup.init_state, out_shardings=shardings)(init_rng)
        start_step = 0
        logging.info("initialised a new run in %s", workdir)
    else:
        logging.info("resumed %s from step %d", workdir, start_step)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
    logging.info("%d trainable parameters; %d steps (%d per epoch)", n_params, total_steps,
                 steps_per_epoch)

    # --- The step -------------------------------------------------------------------------------
    step_fn = jax.jit(
        make_train_step(method, tx, schedule, step_rng, config.on_nonfinite),
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )

    # --- The loop ------------------------------------------------------------------------------
    writer = MetricsWriter(workdir)
    progress = _progress_bar(total_steps, start_step)
    last_time, last_step, nonfinite_seen = time.perf_counter(), start_step, 0
    last = min(total_steps, stop_at_step) if stop_at_step > 0 else total_steps
    for step in range(start_step + 1, last + 1):
        batch = parallel.global_batch(_images_and_labels(next(data_iter)), mesh)
        state, metrics = step_fn(state, batch)
        if step == start_step + 1:  # Time compilation apart so images/s measures the steps.
            jax.block_until_ready(state)
            first_step_s = time.perf_counter() - last_time
            logging.info("first step, compilation included: %.1f s", first_step_s)
            last_time, last_step = time.perf_counter(), step
        if step % config.log_every == 0 or step == last:
            metrics = jax.device_get(metrics)
            nonfinite = int(state["nonfinite_steps"])
            now = time.perf_counter()
            metrics["images_per_sec"] = (
                config.batch_size * (step - last_step) / (now - last_time)
                if step > last_step else config.batch_size / first_step_s)
            metrics["nonfinite_steps"] = nonfinite
            metrics["epoch"] = step / steps_per_epoch
            writer.write(step, metrics)
            progress.update(step - progress.n)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}",
                                 img_s=f"{metrics['images_per_sec']:.0f}")
            last_time, last_step = now, step
            if nonfinite > nonfinite_seen:
                logging.warning("%d non-finite step(s) skipped up to step %d", nonfinite, step)
                if config.on_nonfinite == "stop":
                    checkpoints.wait()
                    raise NonFiniteError(
                        f"non-finite loss or gradient before step {step}; the last good "
                        f"checkpoint is step {checkpoints.latest_step()} in {workdir}")
                nonfinite_seen = nonfinite
        if step % config.checkpoint.every_steps == 0 or step == last:
            checkpoints.save(step, state, data_iter)
    progress.close()
    checkpoints.wait()
    writer.close()

    # --- Export ---------------------------------------------------------------------------------
    final_step = int(state["step"])
    if final_step == total_steps:
        target = ckpt_lib.export_encoder(
            workdir, final_step, method.encoder_variables(state["params"], state["extra"]),
            config)
        logging.info("exported the encoder of step %d to %s", final_step, target)
    checkpoints.close()
    return state


def _images_and_labels(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"image": batch["image"], "label": batch["label"]}


def _progress_bar(total: int, initial: int):
    import tqdm

    return tqdm.tqdm(total=total, initial=initial, disable=not sys.stdout.isatty(),
                     unit="step", dynamic_ncols=True)


def define_flags() -> None:
    """The command line of ``python -m ssl_jax.train`` (defined only when run as a program)."""
    config_flags.DEFINE_config_file("config", None, "Training config file.")
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
    flags.DEFINE_string("coordinator_address", "", "host:port of process 0.")
    flags.DEFINE_integer("num_processes", 0, "Processes in a multi-host run.")
    flags.DEFINE_integer("process_id", -1, "This process's index.")
    flags.DEFINE_integer("stop_at_step", 0, "End this invocation after this step (with a "
                         "checkpoint); the run resumes from there when started again.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise flags.Error(f"unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    if args.config is None or args.workdir is None:
        raise flags.Error("--config and --workdir are required")
    train(args.config, args.workdir, args.stop_at_step)


if __name__ == "__main__":
    from ssl_jax import cli

    define_flags()
    cli.run(main)

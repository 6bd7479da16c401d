"""Orbax checkpoints of a run: the whole train state plus the data iterator's position.

Layout of a workdir::

    DIR/config.json              the run's config, written once when the run starts
    DIR/checkpoints/<step>/      state (params, method extras, optimizer) + data (Grain state)
    DIR/export/<step>/           the encoder's variables alone, with encoder.json beside them
    DIR/metrics.jsonl, DIR/events.out.tfevents.*, DIR/eval.json

A workdir belongs to one run: starting a different method or model in it is refused, so a
typo in ``--workdir`` never overwrites somebody's checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain.python as grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from ssl_jax import config as config_lib

# Keys whose change makes a checkpoint unusable for the new config.
IDENTITY_KEYS = ("method", "model")


class WorkdirError(ValueError):
    """The workdir holds something that does not fit this run."""


def workdir_path(workdir: epath.PathLike) -> epath.Path:
    """The workdir as an absolute path (Orbax refuses relative ones); ``gs://...`` as is."""
    text = os.fspath(workdir)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def check_workdir(workdir: epath.PathLike, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir that holds a run of another method or model; records the config of a new
    run. Changes to other keys (e.g. the number of epochs) are allowed on resume and logged."""
    workdir = workdir_path(workdir)
    saved_path = workdir / "config.json"
    if saved_path.exists():
        saved = config_lib.from_json(saved_path.read_text())
        for key in IDENTITY_KEYS:
            if key not in saved or saved[key] != config[key]:
                raise WorkdirError(
                    f"workdir {workdir} holds a run with {key}={_short(saved.get(key))}, but this "
                    f"config has {key}={_short(config[key])}. Use a new --workdir for a different "
                    f"run, or the run's own config (saved in {saved_path}) to resume it."
                )
        if config_lib.to_json(saved) != config_lib.to_json(config):
            logging.warning("resuming %s with a config that differs from %s", workdir, saved_path)
        return
    if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
        raise WorkdirError(
            f"workdir {workdir} holds checkpoints but no config.json, so it cannot be checked "
            "against this config; use a new --workdir."
        )
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = workdir / "config.json.tmp"
        tmp.write_text(config_lib.to_json(config))
        tmp.replace(saved_path)


def load_run_config(workdir: epath.PathLike) -> ml_collections.ConfigDict:
    path = workdir_path(workdir) / "config.json"
    if not path.exists():
        raise WorkdirError(
            f"{path} not found: --workdir must be the directory of a training run "
            "(python -m ssl_jax.train ... --workdir DIR)"
        )
    return config_lib.from_json(path.read_text())


def _short(value: Any) -> str:
    if isinstance(value, ml_collections.ConfigDict):
        return json.dumps(value.to_dict(), sort_keys=True, default=str)
    return repr(value)


class RunCheckpoints:
    """Saves and restores ``{'state': train state, 'data': Grain iterator}`` per step.

    Keeps the newest ``keep`` checkpoints and, in addition, every step that is a multiple of
    ``keep_every`` (0: none). Saves are asynchronous when ``async_save``.
    """

    def __init__(
        self,
        workdir: epath.PathLike,
        keep: int = 3,
        keep_every: int = 0,
        async_save: bool = True,
        read_only: bool = False,
    ):
        policies = [ocp.checkpoint_managers.LatestN(max(keep, 1))]
        if keep_every:
            policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        self.directory = workdir_path(workdir) / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.PyGrainCheckpointHandler(),
            },
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.PyGrainCheckpointSave(data_iterator),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
        """The state at ``step`` laid out as ``abstract_state`` (shapes + shardings); also moves
        ``data_iterator`` to its saved position when given."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.PyGrainCheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_latest_good(self, abstract_state: Any, data_iterator: Any = None):
        """``(step, state)`` of the newest checkpoint that restores, or ``(None, None)`` when
        there is no checkpoint at all.

        A checkpoint that fails to restore (truncated or garbled files) is reported with a warning
        and skipped; nothing is deleted. If checkpoints exist but none restores, this raises
        rather than letting a fresh run start (and later save) beside them.
        """
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                return step, self.restore(step, abstract_state, data_iterator)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back.
                logging.warning(
                    "checkpoint %s is unreadable (%s: %s); falling back to an older one",
                    self.directory / str(step), type(e).__name__, str(e)[:200],
                )
        if steps:
            raise WorkdirError(
                f"none of the checkpoints {steps} in {self.directory} restores into this "
                "config's state (see the warnings above); nothing was changed. Use a new "
                "--workdir, or the config the run was started with.")
        return None, None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def export_encoder(
    workdir: epath.PathLike, step: int, variables: Any, config: ml_collections.ConfigDict
) -> epath.Path:
    """Writes the encoder's variables to ``DIR/export/<step>/`` with ``encoder.json`` (model
    config and input size), for use outside this project's jobs."""
    target = workdir_path(workdir) / "export" / str(step)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target / "variables", variables, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        meta = {"model": config.model.to_dict(), "method": config.method, "step": step,
                "image_size": config.data.image_size}
        (target / "encoder.json").write_text(json.dumps(meta, indent=2, default=str))
    return target


def restore_state(
    workdir: epath.PathLike, config: ml_collections.ConfigDict, mesh: Mesh, step: int = -1
) -> tuple[Any, dict[str, Any], int]:
    """``(method, train_state, step)``: the whole state (params, extra, optimizer) of the
    checkpoint ``step`` (-1: the latest readable one)."""
    checkpoints = RunCheckpoints(workdir, read_only=True)
    steps = checkpoints.all_steps()
    if not steps:
        raise WorkdirError(
            f"no checkpoint in {checkpoints.directory}: train first with "
            f"python -m ssl_jax.train --config ... --workdir {workdir}")
    if step >= 0 and step not in steps:
        raise WorkdirError(
            f"no checkpoint of step {step} in {checkpoints.directory}; available steps: {steps} "
            "(or --config.eval.step=-1 for the latest)")
    from ssl_jax import methods  # the method layer sits left of this one; imported late so
    from ssl_jax.step import build_state  # that a method may restore another run (BEiT)

    method = methods.create(config, mesh)
    setup = build_state(config, mesh, method, total_steps=1, steps_per_epoch=1)
    if step >= 0:
        state = checkpoints.restore(step, setup.abstract)
    else:
        step, state = checkpoints.restore_latest_good(setup.abstract)
        if state is None:
            raise WorkdirError(f"no readable checkpoint in {checkpoints.directory}")
    checkpoints.close()
    return method, state, step

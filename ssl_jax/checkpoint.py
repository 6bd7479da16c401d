"""Orbax checkpoints of a run: the whole train state plus the data iterator's position.

Layout of a workdir::

    DIR/config.json              the run's config, written once when the run starts
    DIR/checkpoints/<step>/      state (params, method extras, optimizer) + data (Grain state)
                                 + fingerprint (a 32-bit checksum of every state leaf)
    DIR/checkpoints/<step>.corrupt-<time>/  an unreadable checkpoint moved aside (kept, unused)
    DIR/export/<step>/           the encoder's variables alone, with encoder.json beside them
    DIR/metrics.jsonl, DIR/events.out.tfevents.*, DIR/eval.json

A workdir belongs to one run: starting a different method or model in it is refused, so a
typo in ``--workdir`` never overwrites somebody's checkpoints.

The training job writes through an Orbax ``CheckpointManager`` (:class:`RunCheckpoints`); jobs
that only read a run restore a step directory with a plain ``Checkpointer``
(:class:`ReadOnlyCheckpoints`, :func:`restore_step`; Orbax documents the manager as unsafe for
concurrent jobs). This module knows no method: building a run's state to restore into is
:mod:`ssl_jax.restore`'s.

A checkpoint is written to a temporary directory and renamed to ``<step>`` only when complete
(Orbax), so a process killed during a save leaves no ``<step>`` behind; the leftover temporary
directory is removed at the next start. A complete checkpoint whose files were later truncated,
garbled or deleted fails to restore (or to match its fingerprint): the run then warns, naming
it, resumes from the newest good one and moves the bad one aside (never deleting it) so that
the step can be saved again.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ssl_jax import config as config_lib

# Keys whose change makes a checkpoint unusable for the new config.
IDENTITY_KEYS = ("method", "model")


def run_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The :data:`IDENTITY_KEYS` of a run's config as plain values, but for ``model.dtype``: a
    run may resume, be evaluated or fine-tuned in another compute precision (its parameters are
    float32 either way), and runs saved before the key existed computed in float32."""
    identity = {}
    for key in IDENTITY_KEYS:
        value = config.get(key)
        value = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k != "dtype"}
        identity[key] = value
    return identity


class WorkdirError(ValueError):
    """The workdir holds something that does not fit this run."""


class CorruptCheckpointError(WorkdirError):
    """A checkpoint's arrays do not match the fingerprint saved with them."""


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
        saved_id, now_id = run_identity(saved), run_identity(config)
        for key in IDENTITY_KEYS:
            if saved_id[key] is None or saved_id[key] != now_id[key]:
                raise WorkdirError(
                    f"workdir {workdir} holds a run with {key}={_short(saved.get(key))}, but this "
                    f"config has {key}={_short(config[key])}. Use a new --workdir for a different "
                    f"run, or the run's own config (saved in {saved_path}) to resume it."
                )
        _check_state_layout(workdir, saved, config)
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


def _check_state_layout(workdir: epath.Path, saved: ml_collections.ConfigDict,
                        config: ml_collections.ConfigDict) -> None:
    """Keys that change what a checkpoint's train state holds may not change on resume: the online
    probe adds its own state (a run saved before the key existed had none)."""
    was = bool(saved.get("online_probe", {}).get("enabled", False))
    now = bool(config.get("online_probe", {}).get("enabled", False))
    if was != now:
        raise WorkdirError(
            f"workdir {workdir} holds a run with online_probe.enabled={was}, but this config has "
            f"online_probe.enabled={now}: its checkpoints {'hold' if was else 'have no'} probe "
            f"state. Resume with --config.online_probe.enabled={str(was).lower()}, or use a new "
            "--workdir.")


def load_run_config(workdir: epath.PathLike) -> ml_collections.ConfigDict:
    path = workdir_path(workdir) / "config.json"
    if not path.exists():
        raise WorkdirError(
            f"{path} not found: --workdir must be the directory of a training run "
            "(python -m ssl_jax.train ... --workdir DIR)"
        )
    return config_lib.upgrade_run_config(config_lib.from_json(path.read_text()))


def _short(value: Any) -> str:
    if isinstance(value, ml_collections.ConfigDict):
        return json.dumps(value.to_dict(), sort_keys=True, default=str)
    return repr(value)


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The items of a checkpoint and their Orbax handlers: ``state`` (the train state),
    ``data`` (the Grain iterator's position), ``fingerprint`` (JSON)."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    items = {"state": (ocp.StandardCheckpointHandler(), ocp.args.StandardSave,
                       ocp.args.StandardRestore),
             "data": (grain_checkpoint.CheckpointHandler(), grain_checkpoint.CheckpointSave,
                      grain_checkpoint.CheckpointRestore),
             "fingerprint": (ocp.JsonCheckpointHandler(), ocp.args.JsonSave, ocp.args.JsonRestore)}
    for name, (handler, save_args, restore_args) in items.items():
        registry.add(name, save_args, handler)
        registry.add(name, restore_args, handler)
    return registry


def checkpoint_steps(directory: epath.PathLike) -> list[int]:
    """The sorted steps of the complete checkpoints in ``directory`` (``DIR/checkpoints``);
    reads only the listing. Orbax writes a checkpoint under a temporary name and renames it (on
    object stores it marks it complete with ``commit_success.txt``); ``<step>.corrupt-<time>``
    and temporary directories are not steps."""
    directory = epath.Path(directory)
    if not directory.exists():
        return []
    remote = "://" in os.fspath(directory)
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()
                  and (not remote or (p / "commit_success.txt").exists()))


def restore_step(step_dir: epath.PathLike, abstract_state: Any, data_iterator: Any = None) -> Any:
    """The state of one checkpoint directory ``DIR/checkpoints/<step>`` laid out as
    ``abstract_state`` (shapes + shardings), read with a plain Orbax ``Checkpointer`` (no
    ``CheckpointManager``: safe while another job writes the run). Also moves
    ``data_iterator`` to its saved position when given.

    Raises:
      CorruptCheckpointError: the arrays read do not match the checkpoint's fingerprint
        (checkpoints written before fingerprints existed are not checked).
      Exception: whatever Orbax raises for truncated, garbled or missing files.
    """
    step_dir = epath.Path(step_dir)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        items["data"] = grain_checkpoint.CheckpointRestore(data_iterator)
    checked = (step_dir / "fingerprint").exists()
    if checked:
        items["fingerprint"] = ocp.args.JsonRestore()
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler(
            handler_registry=_handler_registry())) as checkpointer:
        restored = checkpointer.restore(step_dir, args=ocp.args.Composite(**items))
    if checked:
        _check_fingerprint(step_dir, restored["state"], restored["fingerprint"])
    return restored["state"]


class ReadOnlyCheckpoints:
    """Reads the checkpoints of a run without a ``CheckpointManager`` (which Orbax documents as
    unsafe for jobs running beside the one that writes): the evaluation and fine-tuning jobs,
    BEiT's tokenizer. Never writes, moves or deletes anything."""

    def __init__(self, workdir: epath.PathLike):
        self.directory = workdir_path(workdir) / "checkpoints"

    def all_steps(self) -> list[int]:
        return checkpoint_steps(self.directory)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
        """The state at ``step`` (see :func:`restore_step`)."""
        return restore_step(self.directory / str(step), abstract_state, data_iterator)

    def restore_latest_good(self, abstract_state: Any, data_iterator: Any = None):
        """``(step, state)`` of the newest checkpoint that restores, or ``(None, None)`` when
        there is no checkpoint at all.

        A checkpoint that fails to restore (truncated, garbled or missing files, a fingerprint
        mismatch) is reported with a warning naming its directory and skipped (and, by
        :class:`RunCheckpoints`, moved aside once an older one restored). If checkpoints exist
        but none restores, this raises rather than letting a fresh run start (and later save)
        beside them. All processes of a run agree on the step.
        """
        steps = self.all_steps()
        unreadable = []
        for step in reversed(steps):
            state, error = None, None
            try:
                state = self.restore(step, abstract_state, data_iterator)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back.
                error = e
            if _all_processes_agree(error is None):
                if unreadable:
                    self._unreadable(unreadable)
                return step, state
            logging.warning(
                "checkpoint %s is unreadable (%s); falling back to an older one",
                self.directory / str(step),
                f"{type(error).__name__}: {str(error)[:300]}" if error else "on another process",
            )
            unreadable.append(step)
        if steps:
            raise WorkdirError(
                f"none of the checkpoints {steps} in {self.directory} restores into this "
                "config's state (see the warnings above); nothing was changed. Use a new "
                "--workdir, or the config the run was started with.")
        return None, None

    def _unreadable(self, steps: list[int]) -> None:
        """Called with the unreadable steps newer than the one restored (read-only: kept)."""

    def close(self) -> None:
        """Nothing to release (the same interface as :class:`RunCheckpoints`)."""


class RunCheckpoints(ReadOnlyCheckpoints):
    """The training job's checkpoints: saves ``{'state': train state, 'data': Grain iterator}``
    per step through an Orbax ``CheckpointManager``, with a fingerprint of the state that a
    restore checks.

    Keeps the newest ``keep`` checkpoints and, in addition, every step that is a multiple of
    ``keep_every`` (0: none). Saves are asynchronous when ``async_save``.
    """

    def __init__(
        self,
        workdir: epath.PathLike,
        keep: int = 3,
        keep_every: int = 0,
        async_save: bool = True,
    ):
        super().__init__(workdir)
        policies = [ocp.checkpoint_managers.LatestN(max(keep, 1))]
        if keep_every:
            policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=_handler_registry())

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        """Orbax's (JAX's) multi-host preemption sync point: all processes agree to save at
        ``step``. Must be asked at every step by every process."""
        return self.manager.reached_preemption(step)

    def save(self, step: int, state: Any, data_iterator: Any) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain_checkpoint.CheckpointSave(data_iterator),
                fingerprint=ocp.args.JsonSave(state_fingerprint(state)),
            ),
            force=True,
        )

    def _unreadable(self, steps: list[int]) -> None:
        """Renames the checkpoints of ``steps`` to ``<step>.corrupt-<time>`` (Orbax ignores
        such names), so that the run can save those steps again; nothing is deleted."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if jax.process_index() == 0:
            for step in steps:
                source = self.directory / str(step)
                target = self.directory / f"{step}.corrupt-{stamp}"
                source.rename(target)
                logging.warning(
                    "moved the unreadable checkpoint %s aside to %s (kept for inspection, "
                    "no longer used) so that the run can save step %d again",
                    source, target, step)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"ssl_jax_move_aside_{min(steps)}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _all_processes_agree(ok: bool) -> bool:
    """``ok`` on every process (a read error may hit one process's shards only)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """uint32 sum over the leaf's bit patterns, each weighted by ``2 * flat_index + 1`` (so any
    single changed word changes it); computed where the leaf lies, without gathering it."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    index = jnp.zeros(words.shape, jnp.uint32)
    for dim, size in enumerate(words.shape):
        index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, words.shape, dim)
    return jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)


@functools.lru_cache(maxsize=8)
def _checksums_fn(mesh: Mesh | None):
    def checksums(leaves):
        return jnp.stack([_leaf_checksum(x) for x in leaves])

    if mesh is None:
        return jax.jit(checksums)
    return jax.jit(checksums, out_shardings=NamedSharding(mesh, P()))


def state_fingerprint(state: Any) -> dict[str, Any]:
    """``{'algorithm': ..., 'leaves': {path: uint32 checksum}}`` of every leaf of ``state``."""
    with_paths = jax.tree_util.tree_flatten_with_path(state)[0]
    leaves = tuple(leaf for _, leaf in with_paths)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    mesh = sharding.mesh if isinstance(sharding, NamedSharding) else None
    sums = np.asarray(_checksums_fn(mesh)(leaves)).tolist() if leaves else []
    names = [jax.tree_util.keystr(path) for path, _ in with_paths]
    return {"algorithm": "uint32-weighted-sum-v1", "leaves": dict(zip(names, sums, strict=True))}


def _check_fingerprint(directory: epath.Path, state: Any, saved: dict[str, Any]) -> None:
    actual = state_fingerprint(state)["leaves"]
    expected = saved.get("leaves", {})
    bad = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
    if bad:
        raise CorruptCheckpointError(
            f"checkpoint {directory} is corrupt: {len(bad)} array(s) do not match the checksums "
            f"saved with them, e.g. {', '.join(bad[:3])}")


def write_state(step_dir: epath.PathLike, state: Any) -> None:
    """Saves a train state without a data position as the checkpoint directory ``step_dir``
    (``DIR/checkpoints/<step>``), with its fingerprint: for runs made outside the trainer
    (weights imported by ``python -m ssl_jax.convert``), which the jobs that read a run
    (:func:`restore_step`) restore like any other; the trainer does not resume them."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler(
            handler_registry=_handler_registry())) as checkpointer:
        checkpointer.save(epath.Path(step_dir), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            fingerprint=ocp.args.JsonSave(state_fingerprint(state))))


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

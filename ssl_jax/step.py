"""The train state and the train step, shared by the trainer, the evaluation job (to restore a
state's layout) and the benchmarks.

The state is a plain pytree ``{step, params, extra, opt_state, nonfinite_steps}``: ``params`` are
what the optimizer trains, ``extra`` is the method's other state (BatchNorm statistics, an EMA
teacher, a centre), saved whole by Orbax.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from ssl_jax import online_probe, optim, parallel
from ssl_jax.data import sources


def make_train_step(method, tx, schedule, base_rng, on_nonfinite: str, probe=None):
    """``(state, batch) -> (state, metrics)``; one optimizer step on the global batch.

    A step whose loss or gradient is not finite leaves the state unchanged (it is only counted),
    so a single bad batch cannot poison the parameters. ``probe``
    (:class:`ssl_jax.online_probe.OnlineProbe`, ``StateSetup.probe``): the online linear probe
    also takes a step on the stop-gradient features of the batch (state key ``probe``).
    """

    def train_step(state: dict[str, Any], batch: dict[str, jax.Array]):
        step = state["step"]
        rng = jax.random.fold_in(base_rng, step)
        grad_fn = jax.value_and_grad(method.loss, has_aux=True)
        (loss, (metrics, extra)), grads = grad_fn(state["params"], state["extra"], batch, rng, step)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        extra = method.after_update(params, extra, step)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = {"step": step + 1, "params": params, "extra": extra, "opt_state": opt_state}
        if probe is not None:  # on the encoder the step started from, as the loss saw it
            variables = method.encoder_variables(state["params"], state["extra"])
            new["probe"], probe_metrics = probe.update(state["probe"], variables, batch)
            metrics = {**metrics, **probe_metrics}
        old = {k: state[k] for k in new} | {"step": step + 1}
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
        new["nonfinite_steps"] = state["nonfinite_steps"] + (~finite).astype(jnp.int32)
        metrics = {**metrics, "loss": loss, "lr": schedule(step), "grad_norm": grad_norm,
                   "param_norm": optax.tree.norm(params)}
        return new, metrics

    return train_step


class StateSetup(NamedTuple):
    """How a run's train state is made: the optimizer, ``init_state(rng) -> state``, and the
    state's abstract layout (shapes, dtypes and shardings, for creation and restore); the online
    probe (None when ``online_probe.enabled`` is off)."""

    schedule: optax.Schedule
    tx: optax.GradientTransformation
    init_state: Any
    abstract: Any
    shardings: Any
    probe: Any = None


def example_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, jax.Array]:
    """A batch of zeros with the fields of the training data (``sources.train_fields``:
    e.g. ``image`` uint8 ``[n, S, S, 3]``, ``label`` int32 ``[n]``), one example per device
    (``n = mesh.size``), for init."""
    fields = sources.train_fields(config.data)
    return {name: jnp.zeros((mesh.size, *field.shape), field.dtype)
            for name, field in fields.items()}


def build_state(
    config: ml_collections.ConfigDict, mesh: Mesh, method: Any, total_steps: int,
    steps_per_epoch: int,
) -> StateSetup:
    """The state ``{step, params, extra, opt_state, nonfinite_steps}`` of ``method`` (and
    ``probe`` with ``online_probe.enabled``: :mod:`ssl_jax.online_probe`)."""
    schedule = optim.learning_rate_schedule(config.optim, config.batch_size, total_steps,
                                            steps_per_epoch)
    tx = optim.make_optimizer(config.optim, schedule, steps_per_epoch, total_steps)
    example = example_batch(config, mesh)
    probe = online_probe.create(config, method, total_steps)

    def init_state(rng):
        params, extra = method.init(rng, example)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "extra": extra,
                 "opt_state": tx.init(params), "nonfinite_steps": jnp.zeros((), jnp.int32)}
        if probe is not None:
            state["probe"] = probe.init(method.encoder_variables(params, extra), example)
        return state

    abstract = jax.eval_shape(init_state, jax.random.key(0))
    shardings = parallel.tree_shardings(abstract, mesh, config.sharding_rules)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return StateSetup(schedule, tx, init_state, abstract, shardings, probe)

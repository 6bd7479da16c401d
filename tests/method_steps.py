"""Pieces the method tests share: one loss-and-gradient step of a method on a device mesh, the
comparison of two gradient trees, and setting a dotted config key."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import parallel


def loss_step(method: Any, params: Any, extra: Any, images: np.ndarray, mesh: Any,
              step: int = 0) -> tuple[Any, Any, Any]:
    """``(loss, grads, metrics)`` on the host of ``method.loss`` for ``images`` sharded over
    ``mesh``'s batch axis (a fixed key, so that meshes can be compared)."""
    batch = jax.device_put({"image": jnp.asarray(images)}, parallel.batch_sharding(mesh))

    @jax.jit
    def run(params, batch):
        grad_fn = jax.value_and_grad(method.loss, has_aux=True)
        (loss, (metrics, _)), grads = grad_fn(params, extra, batch, jax.random.key(3), step)
        return loss, grads, metrics

    return jax.device_get(run(params, batch))


def assert_grads_close(grads: Any, reference: Any) -> None:
    """Leaf by leaf, to float tolerance relative to the largest reference gradient."""
    flat, ref = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(reference)
    scale = max(float(np.max(np.abs(g))) for g in ref)
    for a, b in zip(flat, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def set_key(config: Any, key: str, value: Any) -> None:
    """``config.a.b.c = value`` for ``key = 'a.b.c'`` (the config must be unlocked)."""
    *sections, name = key.split(".")
    target = config
    for part in sections:
        target = target[part]
    target[name] = value

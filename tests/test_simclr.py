"""SimCLR: the global-batch semantics of the step (1 device vs 8 forced CPU devices). NT-Xent
itself is tested against a NumPy transcription of eq. (1) in test_ssl_math.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from configs import simclr as simclr_config
from ssl_jax import methods, parallel


def _one_step(num_devices):
    """Loss, gradients and BatchNorm statistics of one SimCLR step on `num_devices` devices."""
    config = simclr_config.get_config("data=digits,runlocal")
    mesh = parallel.make_mesh(devices=jax.devices()[:num_devices])
    method = methods.create(config, mesh)
    images = jnp.asarray(
        np.random.default_rng(2).integers(0, 256, size=(16, 32, 32, 3)), jnp.uint8)
    batch = {"image": images, "label": jnp.zeros((16,), jnp.int32)}
    params, extra = method.init(jax.random.key(0), batch)
    batch = jax.device_put(batch, parallel.batch_sharding(mesh))

    @jax.jit
    def step(params, extra, batch):
        grad_fn = jax.value_and_grad(method.loss, has_aux=True)
        (loss, (metrics, new_extra)), grads = grad_fn(params, extra, batch, jax.random.key(3), 0)
        return loss, grads, new_extra

    return jax.device_get(step(params, extra, batch))


def test_step_same_on_1_and_8_devices():
    loss1, grads1, extra1 = _one_step(1)
    loss8, grads8, extra8 = _one_step(8)
    assert np.isfinite(loss1)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    flat1, flat8 = jax.tree_util.tree_leaves(grads1), jax.tree_util.tree_leaves(grads8)
    scale = max(float(np.max(np.abs(g))) for g in flat1)
    for a, b in zip(flat8, flat1, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
    # Synced BatchNorm: running statistics computed over the global batch on both.
    chex.assert_trees_all_close(extra8, extra1, rtol=1e-4, atol=1e-6)


def test_simclr_trains_a_vit(tmp_path):
    """The same method and trainer with a ViT encoder (no BatchNorm in the encoder)."""
    from ssl_jax import train

    config = simclr_config.get_config("data=digits,runlocal,model=vit_ti4")
    with config.unlocked():
        config.total_steps = 2
    state = train.train(config, str(tmp_path))
    assert int(state["step"]) == 2 and int(state["nonfinite_steps"]) == 0
    assert "pos_embedding" in state["params"]["encoder"]
    assert state["extra"]["encoder"] == {}

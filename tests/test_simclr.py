"""SimCLR: NT-Xent against a NumPy transcription of eq. (1), and the global-batch semantics of
the step (1 device vs 8 forced CPU devices)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import simclr as simclr_config
from ssl_jax import parallel
from ssl_jax.methods import simclr


def nt_xent_numpy(z1, z2, tau):
    """Eq. (1) of Chen et al. 2020, looped over the 2N anchors."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    losses, correct = [], 0
    for i in range(2 * n):
        j = i + n if i < n else i - n
        sims = np.array([z[i] @ z[k] / tau for k in range(2 * n)])
        others = [k for k in range(2 * n) if k != i]
        denom = np.sum(np.exp(sims[others]))
        losses.append(-np.log(np.exp(sims[j]) / denom))
        correct += others[int(np.argmax(sims[others]))] == j
    return np.mean(losses), correct / (2 * n)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_numpy(tau):
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(2, 12, 5)).astype(np.float32)
    loss, acc = simclr.nt_xent(jnp.asarray(z1), jnp.asarray(z2), tau)
    ref_loss, ref_acc = nt_xent_numpy(z1, z2, tau)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(acc, ref_acc)


def test_nt_xent_sharded_uses_global_negatives():
    """On 8 devices each shard's anchors see all 2N candidates: same loss and gradient."""
    mesh = parallel.make_mesh()
    assert mesh.size == 8
    rng = np.random.default_rng(1)
    z1, z2 = (jnp.asarray(a) for a in rng.normal(size=(2, 16, 6)).astype(np.float32))
    sharded = jax.device_put((z1, z2), parallel.batch_sharding(mesh))

    def loss_fn(mesh_or_none):
        return lambda a, b: simclr.nt_xent(a, b, 0.2, mesh_or_none)[0]

    l1, g1 = jax.value_and_grad(loss_fn(None), argnums=(0, 1))(z1, z2)
    l8, g8 = jax.jit(jax.value_and_grad(loss_fn(mesh), argnums=(0, 1)))(*sharded)
    np.testing.assert_allclose(l8, l1, rtol=1e-6)
    for a, b in zip(g8, g1, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(l1, nt_xent_numpy(np.asarray(z1), np.asarray(z2), 0.2)[0], rtol=1e-5)


def _one_step(num_devices):
    """Loss, gradients and BatchNorm statistics of one SimCLR step on `num_devices` devices."""
    config = simclr_config.get_config("data=digits,runlocal")
    mesh = parallel.make_mesh(devices=jax.devices()[:num_devices])
    method = simclr.create(config, mesh)
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

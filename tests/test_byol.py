"""BYOL: the loss against a NumPy transcription of the paper's code (its regression loss,
symmetrised), the global batch's step (1 device vs 8 forced CPU devices), a target that no
gradient or optimizer reaches, the cosine schedule of tau and the EMA against their formulas,
a run whose evaluation restores the online or the momentum encoder, and bad input. The shared
momentum-encoder structure is ssl_jax/methods/momentum.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import byol as byol_config
from ssl_jax import methods, parallel, train
from ssl_jax.config import ConfigError
from ssl_jax.step import build_state
from tests.method_steps import plain_views, record_calls, step_on_1_and_8_devices

RUNLOCAL = "data=digits,runlocal"


def _config(**changes):
    config = plain_views(byol_config.get_config(RUNLOCAL))
    with config.unlocked():
        config.update_from_flattened_dict(changes)
    return config


def _images(n=16, seed=2):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3)).astype(np.uint8)


def regression_loss_numpy(x, y):
    """BYOL's helpers.regression_loss: ||x / |x| - y / |y|||^2 per row (= 2 - 2 cos)."""
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    y = y / np.linalg.norm(y, axis=-1, keepdims=True)
    return np.sum((x - y) ** 2, axis=-1)


def test_loss_matches_numpy_transcription_of_byol():
    """The method's loss from its own networks' outputs: BYOL's loss_fn, ``mean(l(p1, z2) +
    l(p2, z1))`` over the batch."""
    method = methods.create(_config(), None, total_steps=6, steps_per_epoch=3)
    batch = {"image": jnp.asarray(_images())}
    params, extra = method.init(jax.random.key(0), batch)
    online, target = record_calls(method, "online"), record_calls(method, "target")
    loss, (metrics, _) = method.loss(params, extra, batch, jax.random.key(1), 0)
    (p1, p2), (z1, z2) = ([np.asarray(c[0]) for c in calls] for calls in (online, target))
    ref = np.mean(regression_loss_numpy(p1, z2) + regression_loss_numpy(p2, z1))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["byol_cosine"], 1 - ref / 4, rtol=1e-5)
    assert p1.shape == (16, 32) and not np.allclose(z1, z2)  # two different views


def test_step_same_on_1_and_8_devices_and_no_gradient_reaches_the_target():
    step_on_1_and_8_devices(_config(), _images())


def test_tau_schedule_ema_and_optimizer_state():
    config = _config(**{"byol.momentum": 0.996})
    mesh = parallel.make_mesh()
    method = methods.create(config, mesh, total_steps=100, steps_per_epoch=10)
    steps = np.arange(0, 130, 7)
    taus = np.array([float(method.target_momentum(jnp.int32(k))) for k in steps])
    # BYOL's tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2
    ref = 1 - (1 - 0.996) * (np.cos(np.pi * np.minimum(steps, 100) / 100) + 1) / 2
    np.testing.assert_allclose(taus, ref, rtol=1e-6)
    params, extra = method.init(jax.random.key(0), {"image": jnp.asarray(_images(8))})
    moved = jax.tree_util.tree_map(lambda x: x + 1.0, params)
    out = method.after_update(moved, extra, jnp.int32(30))
    tau = 1 - (1 - 0.996) * (np.cos(np.pi * 30 / 100) + 1) / 2
    for key in ("encoder", "projector"):
        for t, o, new in zip(jax.tree_util.tree_leaves(extra["target"][key]),
                             jax.tree_util.tree_leaves(moved[key]),
                             jax.tree_util.tree_leaves(out["target"][key]), strict=True):
            np.testing.assert_allclose(new, tau * t + (1 - tau) * o, rtol=1e-5, atol=1e-6)
    assert set(out["target"]) == {"encoder", "projector"}  # no momentum predictor
    assert out["target_state"] is extra["target_state"]  # its BN statistics are its own
    state = build_state(config, mesh, method, 100, 10).abstract
    assert set(state["params"]) == {"encoder", "projector", "predictor"}
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
    trace = sum(x.size for x in jax.tree_util.tree_leaves(state["opt_state"]) if x.ndim)
    assert trace == n_params  # LARS's momentum for the online network only


def test_run_evaluates_the_online_or_the_momentum_encoder(tmp_path):
    from ssl_jax.evaluate import features

    config = _config(total_steps=2)
    state = jax.device_get(train.train(config, str(tmp_path)))
    assert int(state["step"]) == 2 and int(state["nonfinite_steps"]) == 0
    mesh = parallel.make_mesh()
    _, online, _ = features.restore_encoder(tmp_path, config, mesh)
    np.testing.assert_array_equal(online["params"]["stem_conv"]["kernel"],
                                  state["params"]["encoder"]["stem_conv"]["kernel"])
    with config.unlocked():
        config.byol.eval_encoder = "momentum"
    _, momentum, _ = features.restore_encoder(tmp_path, config, mesh)
    np.testing.assert_array_equal(momentum["params"]["stem_conv"]["kernel"],
                                  state["extra"]["target"]["encoder"]["stem_conv"]["kernel"])
    assert not np.allclose(momentum["params"]["stem_conv"]["kernel"],
                           online["params"]["stem_conv"]["kernel"])


@pytest.mark.parametrize("key,value,match", [
    ("byol.momentum", 1.5, r"config\.byol\.momentum: is 1.5: .* \[0, 1\]"),
    ("byol.momentum", -0.1, r"config\.byol\.momentum"),
    ("byol.eval_encoder", "teacher", r"config\.byol\.eval_encoder"),
    ("aug.view2.size", 8, r"config\.aug\.view2\.size"),
])
def test_bad_config_named_before_compile(key, value, match):
    with pytest.raises(ConfigError, match=match):
        methods.create(_config(**{key: value}), parallel.make_mesh())

"""Optimizer masks and schedules (optim.py) and config parsing (config.py)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ssl_jax import config as config_lib
from ssl_jax import optim, presets


def test_lr_scaling_and_warmup_cosine():
    cfg = presets.optim_config(base_lr=0.3, warmup_epochs=2.0, end_lr_factor=0.0)
    assert optim.peak_learning_rate(cfg, 4096) == pytest.approx(0.3 * 16)
    cfg.lr_scaling = "sqrt"  # SimCLR's rule: base * sqrt(B)
    assert optim.peak_learning_rate(cfg, 1024) == pytest.approx(0.3 * 32)
    cfg.lr_scaling = "linear"
    sched = optim.learning_rate_schedule(cfg, 512, total_steps=100, steps_per_epoch=10)
    peak = 0.6
    assert float(sched(0)) == 0.0
    assert float(sched(10)) == pytest.approx(peak / 2)  # linear warm-up over 20 steps
    assert float(sched(20)) == pytest.approx(peak)
    # Cosine from the end of warm-up: lr(t) = peak * (1 + cos(pi * (t - 20) / 80)) / 2.
    assert float(sched(60)) == pytest.approx(peak * (1 + np.cos(np.pi * 40 / 80)) / 2, rel=1e-5)
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-7)


def test_lars_skips_biases_and_norm_params():
    """Weight decay and the trust ratio touch kernels only: with a zero gradient, only the
    kernel moves (decay), and the bias / BN scale keep their values."""
    params = {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,)), "bn": {"scale": jnp.ones((4,))}}
    cfg = presets.optim_config(name="lars", weight_decay=0.1, momentum=0.0)
    tx = optim.make_optimizer(cfg, optax.constant_schedule(1.0))
    zeros = {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,)), "bn": {"scale": jnp.zeros(4)}}
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(updates["kernel"]).sum()) > 0
    assert float(jnp.abs(updates["bias"]).sum()) == 0
    assert float(jnp.abs(updates["bn"]["scale"]).sum()) == 0
    assert optim.decay_mask(params) == {"kernel": True, "bias": False, "bn": {"scale": False}}
    tokens = {"cls_token": np.zeros((1, 1, 4)), "pos_embedding": np.zeros((1, 5, 4)),
              "blocks_0": {"attn": {"kernel": np.zeros((4, 4))}}}
    assert optim.decay_mask(tokens) == {"cls_token": False, "pos_embedding": False,
                                        "blocks_0": {"attn": {"kernel": True}}}


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_decay_all_decays_biases_and_norms_by_the_formula(name):
    """``optim.decay_all``: with a zero gradient, every parameter moves by -lr * wd * p (SGD,
    AdamW: decoupled decay; LARS adds wd * p to the gradient, and its trust ratio still skips
    biases and norms, so their step is the same); the default leaves biases and norms alone."""
    params = {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 3.0),
              "bn": {"scale": jnp.full((4,), 0.5)}}
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    lr, wd = 0.5, 0.1
    for decay_all in (True, False):
        cfg = presets.optim_config(name=name, weight_decay=wd, momentum=0.0, decay_all=decay_all)
        tx = optim.make_optimizer(cfg, optax.constant_schedule(lr))
        updates, _ = tx.update(zeros, tx.init(params), params)
        for key in ("bias", "bn"):
            scale = -lr * wd * decay_all
            want = jax.tree_util.tree_map(lambda p, scale=scale: scale * p, params[key])
            jax.tree_util.tree_map(lambda u, w: np.testing.assert_allclose(u, w, rtol=1e-6),
                                   updates[key], want)
        if name != "lars":  # LARS's kernel step is scaled by its trust ratio
            np.testing.assert_allclose(updates["kernel"], -lr * wd * params["kernel"], rtol=1e-6)
    with pytest.raises(config_lib.ConfigError, match="optim.decay_all"):
        bad = ml_collections.ConfigDict({**presets.optim_config().to_dict(), "decay_all": "yes"})
        optim.make_optimizer(bad, optax.constant_schedule(1.0))


def test_bad_optimizer_keys():
    with pytest.raises(ValueError, match="optim.name"):
        optim.make_optimizer(presets.optim_config(name="adam_typo"), optax.constant_schedule(1.0))
    with pytest.raises(config_lib.ConfigError, match="optim.lr_scaling"):
        optim.peak_learning_rate(presets.optim_config(lr_scaling="cubic"), 256)


def test_parse_arg_presets():
    arg = config_lib.parse_arg("data=cifar10,runlocal", data="digits", model="", runlocal=False)
    assert (arg.data, arg.model, arg.runlocal) == ("cifar10", "", True)
    with pytest.raises(config_lib.ConfigError, match="needs a value"):
        config_lib.parse_arg("data", data="digits")


def test_overrides_are_typed_and_known():
    cfg = ml_collections.ConfigDict({"a": 1, "b": {"c": 0.5, "d": "x", "e": (1, 2), "f": True}})
    config_lib.apply_overrides(cfg, ["a=3", "b.c=2", "b.d=y", "b.e=(3, 4)", "b.f=false"])
    assert cfg.a == 3 and cfg.b.c == 2.0 and cfg.b.d == "y" and cfg.b.e == (3, 4)
    assert cfg.b.f is False
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'b.zz'"):
        config_lib.apply_overrides(cfg, ["b.zz=1"])
    with pytest.raises(config_lib.ConfigError, match="expected a value of type int"):
        config_lib.apply_overrides(cfg, ["a=many"])


def test_json_round_trip_keeps_tuples():
    cfg = ml_collections.ConfigDict({"rules": ((".*", "replicate"),), "n": {"x": (0.2, 1.0)}})
    back = config_lib.from_json(config_lib.to_json(cfg))
    assert back.rules == ((".*", "replicate"),) and back.n.x == (0.2, 1.0)


def test_split_config_overrides():
    argv = ["prog", "--workdir", "d", "--config.eval.step=3", "--config.eval.knn_k", "5"]
    others, overrides = config_lib.split_config_overrides(argv)
    assert others == ["prog", "--workdir", "d"]
    assert overrides == ["eval.step=3", "eval.knn_k=5"]


def test_weight_decay_cosine_schedule_in_adamw():
    """``weight_decay_end`` > 0: wd(t) = end + (start - end) (1 + cos(pi t / T)) / 2, applied
    decoupled (update = -lr * wd(t) * p when the gradient is zero)."""
    cfg = presets.optim_config(name="adamw", weight_decay=0.04, weight_decay_end=0.4)
    wd = optim.weight_decay_schedule(cfg, total_steps=10)
    for t in (0, 3, 10, 12):
        expected = 0.4 + (0.04 - 0.4) * (1 + np.cos(np.pi * min(t, 10) / 10)) / 2
        assert float(wd(t)) == pytest.approx(expected, rel=1e-6)
    tx = optim.make_optimizer(cfg, optax.constant_schedule(0.5), total_steps=10)
    params = {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.ones(3)}
    zeros = {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}
    state = tx.init(params)
    for t in range(3):
        updates, state = tx.update(zeros, state, params)
        np.testing.assert_allclose(updates["kernel"], -0.5 * float(wd(t)) * 2.0, rtol=1e-5)
        assert float(jnp.abs(updates["bias"]).max()) == 0.0
    assert optim.weight_decay_schedule(presets.optim_config(weight_decay=0.1), 10) == 0.1


def test_per_parameter_gradient_clipping():
    """DINO's clipping: each gradient to its own norm, unlike one global norm."""
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4])}  # norms 5 and 0.5
    clip = optim.clip_by_parameter_norm(1.0)
    out, _ = clip.update(grads, clip.init(grads))
    np.testing.assert_allclose(out["a"], np.array([3.0, 4.0]) / (5.0 + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(out["b"], grads["b"])  # below the threshold: unchanged
    cfg = presets.optim_config(name="sgd", momentum=0.0, weight_decay=0.0, grad_clip_norm=1.0,
                             grad_clip_kind="per_parameter")
    tx = optim.make_optimizer(cfg, optax.constant_schedule(1.0))
    updates, _ = tx.update(grads, tx.init(grads), grads)
    np.testing.assert_allclose(updates["b"], -grads["b"], rtol=1e-6)


def test_freeze_and_clip_keys_are_checked():
    schedule = optax.constant_schedule(1.0)
    with pytest.raises(config_lib.ConfigError, match="optim.freeze"):
        optim.make_optimizer(presets.optim_config(freeze=(("head", -1.0),)), schedule)
    with pytest.raises(config_lib.ConfigError, match="optim.freeze"):
        optim.make_optimizer(presets.optim_config(freeze=(("head[", 1.0),)), schedule)
    with pytest.raises(config_lib.ConfigError, match="optim.grad_clip_kind"):
        optim.make_optimizer(presets.optim_config(grad_clip_kind="local"), schedule)
    # A config of a run started before these keys existed, as the jobs load it (through
    # config.upgrade_run_config), still builds the same optimizer.
    old = presets.optim_config()
    for key in ("freeze", "weight_decay_end", "grad_clip_kind"):
        del old[key]
    run = config_lib.upgrade_run_config(ml_collections.ConfigDict({"optim": old}))
    tx = optim.make_optimizer(run.optim, schedule)
    params = {"kernel": jnp.ones((2, 2))}
    assert jax.tree_util.tree_structure(tx.init(params)) == jax.tree_util.tree_structure(
        optim.make_optimizer(presets.optim_config(), schedule).init(params))

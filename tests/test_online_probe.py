"""The online linear probe: its step against a NumPy reference, and a run with it whose SSL state
is bit for bit that of the same run without it, its metrics in metrics.jsonl."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import simclr as simclr_config
from ssl_jax import methods, online_probe, parallel, train
from ssl_jax.config import ConfigError
from ssl_jax.data.augment import eval_view
from ssl_jax.restore import restore_state


def _config(**changes):
    config = simclr_config.get_config("data=digits,runlocal")
    with config.unlocked():
        config.update_from_flattened_dict(changes)
    return config


def test_probe_step_matches_numpy():
    """Loss, top-1 and one SGD step (first step of momentum SGD: W - lr * grad) of the linear
    classifier on the frozen features, an unlabelled record (-1) left out."""
    config = _config(**{"online_probe.enabled": True, "online_probe.base_lr": 0.5})
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    method = methods.create(config, mesh)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    labels = np.array([0, 3, 9, 1, -1, 3, 5, 7], np.int32)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    params, extra = method.init(jax.random.key(0), batch)
    probe = online_probe.OnlineProbe(config, method, total_steps=10)
    assert probe.num_classes == 10  # the digits' classes, read from the data
    variables = method.encoder_variables(params, extra)
    state = probe.init(variables, batch)
    w0 = rng.normal(size=state["params"]["kernel"].shape).astype(np.float32)
    b0 = rng.normal(size=(10,)).astype(np.float32)
    state["params"] = {"kernel": jnp.asarray(w0), "bias": jnp.asarray(b0)}
    new, metrics = jax.jit(probe.update)(state, variables, batch)

    feats = np.asarray(probe.features(variables, batch), np.float64)
    views = eval_view(batch["image"], config.aug.view1.size)  # no augmentation
    ref = np.asarray(method.encoder.apply(variables, views, train=False), np.float64)
    np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-6)
    keep = labels >= 0
    logits = feats @ w0 + b0
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(10)[np.maximum(labels, 0)]
    loss = -np.sum(np.log(p[keep, labels[keep]])) / keep.sum()
    top1 = np.sum(np.argmax(logits, 1)[keep] == labels[keep]) / keep.sum()
    dlogits = (p - onehot) * keep[:, None] / keep.sum()
    np.testing.assert_allclose(metrics["probe_loss"], loss, rtol=1e-5)
    assert float(metrics["probe_top1"]) == pytest.approx(top1)
    np.testing.assert_allclose(new["params"]["kernel"], w0 - 0.5 * feats.T @ dlogits,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["params"]["bias"], b0 - 0.5 * dlogits.sum(0),
                               rtol=1e-4, atol=1e-6)


def test_run_with_probe_has_the_same_ssl_state(tmp_path):
    """Two steps with and without the probe: the same parameters, method state and optimizer
    state bit for bit; the probe's loss and top-1 in metrics.jsonl; its state in the checkpoint,
    which the jobs that read a run restore."""
    common = {"total_steps": 2, "log_every": 1, "checkpoint.every_steps": 2}
    plain = jax.device_get(train.train(_config(**common), str(tmp_path / "plain")))
    probed = jax.device_get(train.train(
        _config(**common, **{"online_probe.enabled": True}), str(tmp_path / "probe")))
    for key in ("params", "extra", "opt_state", "step"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, probed[key], plain[key])
    assert "probe" not in plain
    kernel = probed["probe"]["params"]["kernel"]
    assert kernel.shape[1] == 10 and np.abs(kernel).sum() > 0  # it learnt from zeros
    rows = [json.loads(line) for line in (tmp_path / "probe" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= row["probe_top1"] <= 1.0 and np.isfinite(row["probe_loss"])
    assert rows[0]["probe_loss"] == pytest.approx(np.log(10), rel=1e-5)  # zero init: uniform
    from ssl_jax.checkpoint import load_run_config

    config = load_run_config(tmp_path / "probe")
    _, state, step = restore_state(tmp_path / "probe", config, parallel.make_mesh())
    assert step == 2
    np.testing.assert_array_equal(state["probe"]["params"]["kernel"], kernel)
    # Switching the probe on or off on resume would change the checkpoint's state layout: refused
    # before anything is written, naming the key.
    from ssl_jax.checkpoint import WorkdirError

    before = sorted(p.name for p in (tmp_path / "plain").rglob("*"))
    for name, enabled in (("plain", True), ("probe", False)):
        with pytest.raises(WorkdirError, match=rf"online_probe\.enabled={not enabled}, but "
                           rf"this config has online_probe\.enabled={enabled}"):
            train.train(_config(**{**common, "total_steps": 4,
                                   "online_probe.enabled": enabled}), str(tmp_path / name))
    assert sorted(p.name for p in (tmp_path / "plain").rglob("*")) == before


@pytest.mark.parametrize("changes, match", [
    ({"online_probe.base_lr": 0.0}, r"config\.online_probe\.base_lr: must be > 0"),
    ({"online_probe.num_classes": -1}, r"config\.online_probe\.num_classes: must be >= 0"),
])
def test_bad_probe_keys_are_refused(tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match):
        train.train(_config(**changes), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()

"""MoCo v2: the loss against a NumPy transcription of MoCo's Algorithm 1, the queue (enqueued
with the global batch's keys in order, wrapping around, the same on 1 device and 8 forced CPU
devices, restored bit for bit by a resumed run), shuffled BatchNorm groups against the BN leak,
no gradient into the key encoder or the queue, evaluation of either encoder, and bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import moco_v2 as moco_config
from ssl_jax import methods, parallel
from ssl_jax.config import ConfigError
from ssl_jax.methods.ssl_math import l2_normalize
from tests.method_steps import (
    assert_train_refuses,
    plain_views,
    record_calls,
    run_and_resume,
    step_on_1_and_8_devices,
)
from tests.test_ssl_math import moco_algorithm1_numpy

RUNLOCAL = "data=digits,runlocal"  # batch 16, K = 64, symmetric, 2 BatchNorm groups


def _config(**changes):
    config = plain_views(moco_config.get_config(RUNLOCAL))
    with config.unlocked():
        config.update_from_flattened_dict(changes)
    return config


def _images(n=16, seed=2):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3)).astype(np.uint8)


def _method(mesh=None, **changes):
    method = methods.create(_config(**changes), mesh, total_steps=6, steps_per_epoch=3)
    params, extra = method.init(jax.random.key(0), {"image": jnp.asarray(_images())})
    return method, params, extra


@pytest.mark.parametrize("symmetric", [False, True])
def test_loss_and_enqueue_match_moco_algorithm1(symmetric):
    method, params, extra = _method(**{"moco_v2.symmetric": symmetric,
                                       "moco_v2.queue_size": 96})
    extra["queue_ptr"] = jnp.int32(32)
    queries, keys = record_calls(method, "online"), record_calls(method, "keys")
    loss, (metrics, new) = method.loss(params, extra, {"image": jnp.asarray(_images())},
                                       jax.random.key(1), 0)
    q = [np.asarray(c[0]) for c in queries]
    k = [np.asarray(c[0]) for c in keys]
    queue = np.asarray(extra["queue"])
    if symmetric:  # the views swapped, the two losses averaged, against the same queue
        refs = [moco_algorithm1_numpy(q[0], k[0], queue, 0.2),
                moco_algorithm1_numpy(q[1], k[1], queue, 0.2)]
    else:
        refs = [moco_algorithm1_numpy(q[0], k[0], queue, 0.2)]
    np.testing.assert_allclose(loss, np.mean([r[0] for r in refs]), rtol=1e-5)
    np.testing.assert_allclose(metrics["contrastive_acc"], np.mean([r[1] for r in refs]))
    # enqueue(k): the batch's normalised keys in order at rows ptr.., the rest untouched
    enqueued = np.concatenate(k) / np.linalg.norm(np.concatenate(k), axis=1, keepdims=True)
    n = len(enqueued)
    np.testing.assert_allclose(new["queue"][32:32 + n], enqueued, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.delete(new["queue"], np.s_[32:32 + n], 0),
                                  np.delete(queue, np.s_[32:32 + n], 0))
    assert int(new["queue_ptr"]) == (32 + n) % 96 and n == 16 * (2 if symmetric else 1)


def test_queue_wraps_around_over_steps():
    method, params, extra = _method()  # K = 64, 32 keys a step: wraps every second step
    step = jax.jit(lambda e, images, s: method.loss(params, e, {"image": images},
                                                    jax.random.key(s), s)[1][1])
    queues, ptrs = [extra["queue"]], []
    for s in range(3):
        extra = step(extra, jnp.asarray(_images(seed=s)), s)
        queues.append(extra["queue"])
        ptrs.append(int(extra["queue_ptr"]))
    assert ptrs == [32, 0, 32]
    np.testing.assert_array_equal(queues[2][:32], queues[1][:32])  # step 1's keys kept
    np.testing.assert_array_equal(queues[3][32:], queues[2][32:])  # step 2's keys kept
    assert not np.allclose(queues[3][:32], queues[2][:32])  # step 1's (oldest) overwritten
    np.testing.assert_allclose(np.linalg.norm(queues[3], axis=1), 1.0, rtol=1e-5)


def test_queue_loss_and_gradients_same_on_1_and_8_devices():
    """The same queue, pointer, loss, gradients and (grouped) BatchNorm statistics; nothing
    reaches the keys, the queue or the key encoder."""
    results = step_on_1_and_8_devices(_config(), _images())
    (_, _, _, extra1, _), (_, _, _, extra8, _) = results
    np.testing.assert_allclose(extra8["queue"], extra1["queue"], rtol=1e-5, atol=1e-6)
    assert int(extra8["queue_ptr"]) == int(extra1["queue_ptr"]) == 32


def test_shuffled_bn_groups_close_the_leak():
    """A key's BatchNorm statistics are those of its group of the permuted batch: changing an
    image of that group changes the key, changing any other image (its query's group mates
    included) does not. So a query and its key are normalised with different images."""
    method, _, extra = _method()  # bn_groups=2: groups of 8 of a batch of 16
    rng = jax.random.key(5)
    views = jnp.asarray(np.random.default_rng(0).normal(size=(16, 16, 16, 3)), jnp.float32)
    keys = jax.jit(lambda x: method.keys(extra, extra["target_state"], x, rng)[0])
    perm = np.asarray(jax.random.permutation(rng, 16))
    key_group = set(perm[:8].tolist())
    assert key_group not in ({*range(8)}, {*range(8, 16)})  # not the queries' groups
    i = int(perm[0])
    base = np.asarray(keys(views))
    for j in range(16):
        if j == i:
            continue
        changed = np.asarray(keys(views.at[j].multiply(3.0)))
        moved = not np.allclose(changed[i], base[i], atol=1e-6)
        assert moved == (j in key_group), (i, j)


@pytest.fixture(scope="module")
def moco_runs(tmp_path_factory):
    """A 3-step run and a copy of its step-1 checkpoint resumed to step 3 (the state of a run
    killed after its step-1 checkpoint): ``(full, resumed, full_dir)``."""
    config = _config(total_steps=3, **{"checkpoint.every_steps": 1})
    root = tmp_path_factory.mktemp("moco_v2_runs")
    return (*run_and_resume(config, root), root / "full")


def test_resumed_run_restores_the_queue_bit_for_bit(moco_runs):
    full, resumed, _ = moco_runs
    assert int(resumed["step"]) == 3 and int(resumed["nonfinite_steps"]) == 0
    assert int(full["extra"]["queue_ptr"]) == 32  # 3 steps of 32 keys in a queue of 64
    chex.assert_trees_all_equal(full["extra"], resumed["extra"])
    chex.assert_trees_all_equal(full["params"], resumed["params"])


def test_evaluation_of_the_momentum_encoder(moco_runs):
    from ssl_jax.evaluate import __main__ as evaluate_job
    from ssl_jax.evaluate import features

    full, _, workdir = moco_runs
    results = evaluate_job.evaluate(str(workdir), [
        "eval.random_init_baseline=false", "eval.probe_epochs=2",
        "moco_v2.eval_encoder=momentum"])
    assert results["method"] == "moco_v2" and np.isfinite(results["ssl"]["knn_top1"])
    config = _config(total_steps=3, **{"moco_v2.eval_encoder": "momentum"})
    _, variables, _ = features.restore_encoder(workdir, config, parallel.make_mesh())
    chex.assert_trees_all_equal(jax.device_get(variables["params"]),
                                full["extra"]["target"]["encoder"])


@pytest.mark.parametrize("key,value,match", [
    ("moco_v2.queue_size", 100, r"config\.moco_v2\.queue_size: K=100 must be a positive "
                                r"multiple of the 32 keys"),
    ("moco_v2.temperature", 0.0, r"config\.moco_v2\.temperature"),
    ("moco_v2.temperature", -0.2, r"config\.moco_v2\.temperature"),
    ("moco_v2.momentum", 1.01, r"config\.moco_v2\.momentum"),
    ("moco_v2.bn_groups", 3, r"config\.moco_v2\.bn_groups"),
])
def test_bad_config_named_before_compile(key, value, match):
    with pytest.raises(ConfigError, match=match):
        methods.create(_config(**{key: value}), parallel.make_mesh())


def test_a_predictor_key_is_refused_naming_it():
    config = _config()
    with config.unlocked():
        config.moco_v2.pred_hidden_dim = 512
    with pytest.raises(ConfigError, match=r"config\.moco_v2\.pred_hidden_dim: MoCo v2 has no "
                                          r"predictor"):
        methods.create(config, None)


def test_bad_queue_size_exits_2_before_compiling(tmp_path):
    assert_train_refuses(tmp_path, f"configs/moco_v2.py:{RUNLOCAL}",
                         "--config.moco_v2.queue_size=100", "config.moco_v2.queue_size: K=100")


def test_queue_starts_as_random_unit_keys():
    _, _, extra = _method()
    assert extra["queue"].shape == (64, 32) and int(extra["queue_ptr"]) == 0
    np.testing.assert_allclose(l2_normalize(extra["queue"]), extra["queue"], rtol=1e-6)

"""MoCo v3: the loss against a NumPy transcription of the paper's Algorithm 1 (with the official
code's 2 tau factor), negatives from the global batch (1 device vs 8 forced CPU devices), no
gradient into the momentum encoder, the momentum schedule, the ViT's frozen random patch
projection (kept out of the trained parameters, restored by evaluation, attention pictures),
and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import moco_v3 as moco_config
from ssl_jax import methods, parallel, train
from ssl_jax.config import ConfigError
from ssl_jax.step import build_state
from tests.method_steps import plain_views, record_calls, step_on_1_and_8_devices

RUNLOCAL = "data=digits,runlocal"  # a ResNet
VIT = "data=digits,model=vit_ti4,runlocal"  # the patch projection frozen


def _config(arg=RUNLOCAL, **changes):
    config = plain_views(moco_config.get_config(arg))
    with config.unlocked():
        config.update_from_flattened_dict(changes)
    return config


def _images(n=16, seed=2):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3)).astype(np.uint8)


def ctr_numpy(q, k, tau):
    """MoCo v3's contrastive_loss: normalise, logits q k^T / tau against all keys, labels the
    own rows, cross-entropy times 2 tau."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    logits = q @ k.T / tau
    logits = logits - logits.max(axis=1, keepdims=True)
    log_prob = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -np.mean(np.diag(log_prob)) * 2 * tau


@pytest.mark.parametrize("arg", [RUNLOCAL, VIT])
def test_loss_matches_numpy_algorithm1(arg):
    method = methods.create(_config(arg), None, total_steps=6, steps_per_epoch=3)
    batch = {"image": jnp.asarray(_images())}
    params, extra = method.init(jax.random.key(0), batch)
    online, target = record_calls(method, "online"), record_calls(method, "target")
    loss, _ = method.loss(params, extra, batch, jax.random.key(1), 0)
    (q1, q2), (k1, k2) = ([np.asarray(c[0]) for c in calls] for calls in (online, target))
    ref = ctr_numpy(q1, k2, 0.2) + ctr_numpy(q2, k1, 0.2)  # L = ctr(q1, k2) + ctr(q2, k1)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_global_negatives_same_on_1_and_8_devices_and_no_gradient_to_the_target():
    (_, _, metrics1, _, _), (_, _, metrics8, _, _) = step_on_1_and_8_devices(_config(), _images())
    np.testing.assert_allclose(metrics8["contrastive_acc"], metrics1["contrastive_acc"])


@pytest.mark.parametrize("cosine", [True, False])
def test_momentum_schedule(cosine):
    config = _config(**{"moco_v3.momentum_cosine": cosine})
    method = methods.create(config, None, total_steps=50, steps_per_epoch=5)
    steps = np.arange(0, 60, 5)
    got = np.array([float(method.target_momentum(jnp.int32(k))) for k in steps])
    # The official adjust_moco_momentum: 1 - 0.5 (1 + cos(pi t / T)) (1 - m)
    ref = (1 - 0.5 * (1 + np.cos(np.pi * np.minimum(steps, 50) / 50)) * (1 - 0.99) if cosine
           else np.full(len(steps), 0.99))
    np.testing.assert_allclose(got, ref, rtol=1e-6)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """A 2-step run of a ViT with the frozen patch projection: ``(config, init extra, state,
    workdir)``."""
    config = _config(VIT, total_steps=2)
    workdir = tmp_path_factory.mktemp("moco_v3_vit")
    method = methods.create(config, parallel.make_mesh(), total_steps=2, steps_per_epoch=2)
    setup = build_state(config, parallel.make_mesh(), method, 2, 2)
    init = jax.device_get(jax.jit(setup.init_state)(jax.random.split(jax.random.key(0))[0]))
    state = jax.device_get(train.train(config, str(workdir)))
    return config, init, state, workdir


def test_patch_projection_stays_at_its_random_init(vit_run):
    config, init, state, _ = vit_run
    assert int(state["step"]) == 2 and int(state["nonfinite_steps"]) == 0
    assert "patch_embed" not in state["params"]["encoder"]  # not trained: no optimizer state
    assert not any("patch_embed" in jax.tree_util.keystr(path)
                   for path, _ in jax.tree_util.tree_leaves_with_path(state["opt_state"]))
    frozen = state["extra"]["frozen"]["patch_embed"]
    np.testing.assert_array_equal(frozen["kernel"],
                                  init["extra"]["frozen"]["patch_embed"]["kernel"])
    # ... while the rest of the encoder trained
    assert not np.allclose(state["params"]["encoder"]["cls_token"],
                           init["params"]["encoder"]["cls_token"])
    method = methods.create(config, None)
    variables = method.encoder_variables(state["params"], state["extra"])
    np.testing.assert_array_equal(variables["params"]["patch_embed"]["kernel"], frozen["kernel"])
    x = jnp.zeros((2, 16, 16, 3))
    assert method.encoder.apply(variables, x, train=False).shape == (2, 192)


def test_evaluation_restores_the_whole_encoder_and_draws_attention(vit_run):
    from ssl_jax.evaluate import __main__ as evaluate_job

    _, _, _, workdir = vit_run
    results = evaluate_job.evaluate(str(workdir), ["eval.random_init_baseline=false",
                                                   "eval.probe_epochs=2"])
    assert results["method"] == "moco_v3" and np.isfinite(results["ssl"]["linear_top1"])
    assert Image.open(workdir / "attention_step2.png").size[0] > 0


@pytest.mark.parametrize("key,value,match", [
    ("moco_v3.freeze_patch_embed", True,
     r"config\.moco_v3\.freeze_patch_embed: model\.name='resnet18' has no patch projection"),
    ("moco_v3.temperature", 0.0, r"config\.moco_v3\.temperature: is 0.0: must be > 0"),
    ("moco_v3.momentum", 2.0, r"config\.moco_v3\.momentum"),
    ("moco_v3.proj_layers", 0, r"config\.moco_v3\.proj_layers"),
])
def test_bad_config_named_before_compile(key, value, match):
    with pytest.raises(ConfigError, match=match):
        methods.create(_config(**{key: value}), parallel.make_mesh())

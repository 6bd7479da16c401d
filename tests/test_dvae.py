"""dVAE tokenizer: Gumbel-softmax sampling and straight-through gradients, the schedules, the
KL to the uniform prior and the loss against NumPy, the encoder/decoder shapes, token ids,
the same step on 1 and 8 devices, bad configs, and train -> evaluate with its pictures."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import dvae as dvae_config
from ssl_jax import methods, parallel, train
from ssl_jax.config import ConfigError
from ssl_jax.data import augment
from ssl_jax.evaluate import __main__ as evaluate_main
from ssl_jax.evaluate import tokenizer
from ssl_jax.methods import dvae
from ssl_jax.models.dvae import DiscreteVAE, DVAEEncoder
from tests.method_steps import assert_grads_close, loss_step, set_key


def _np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _config(**dvae_overrides):
    config = dvae_config.get_config("data=digits,runlocal")
    with config.unlocked():
        config.dvae.update(dvae_overrides)
    return config


# --- Gumbel-softmax --------------------------------------------------------------------------


def test_gumbel_argmax_frequencies_follow_softmax():
    logits = jnp.asarray([1.0, 0.0, -1.0, 2.0])
    samples = dvae.gumbel_softmax(jax.random.key(0), jnp.broadcast_to(logits, (40000, 4)), 1.0)
    freq = np.bincount(np.asarray(jnp.argmax(samples, -1)), minlength=4) / 40000
    np.testing.assert_allclose(freq, _np_softmax(np.asarray(logits)), atol=0.01)


def test_soft_sample_is_a_distribution_and_sharpens_with_temperature():
    logits = jax.random.normal(jax.random.key(1), (512, 16))
    entropies = []
    for tau in (4.0, 1.0, 0.25, 1 / 16):
        y = np.asarray(dvae.gumbel_softmax(jax.random.key(2), logits, tau))
        np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-5)
        assert (y >= 0).all()
        entropies.append(float(np.mean(-np.sum(y * np.log(y + 1e-12), -1))))
        if tau == 1 / 16:
            assert np.mean(y.max(-1)) > 0.9  # close to one-hot
    assert entropies == sorted(entropies, reverse=True)
    # Same key: the same Gumbel noise, so the sample's argmax does not depend on tau.
    a = dvae.gumbel_softmax(jax.random.key(2), logits, 1.0)
    b = dvae.gumbel_softmax(jax.random.key(2), logits, 0.1)
    np.testing.assert_array_equal(np.argmax(a, -1), np.argmax(b, -1))


def test_straight_through_forward_is_one_hot_and_gradient_is_the_soft_one():
    logits = jax.random.normal(jax.random.key(3), (6, 10))
    weights = jax.random.normal(jax.random.key(4), (6, 10))
    hard = dvae.gumbel_softmax(jax.random.key(5), logits, 0.5, hard=True)
    soft = dvae.gumbel_softmax(jax.random.key(5), logits, 0.5)
    expected = np.eye(10, dtype=np.float32)[np.argmax(np.asarray(soft), -1)]
    np.testing.assert_array_equal(np.asarray(hard), expected)  # exactly 0 and 1

    def objective(z, hard):
        return jnp.sum(weights * dvae.gumbel_softmax(jax.random.key(5), z, 0.5, hard=hard))

    grad_hard = jax.grad(objective)(logits, True)
    grad_soft = jax.grad(objective)(logits, False)
    assert float(jnp.max(jnp.abs(grad_soft))) > 0
    np.testing.assert_allclose(np.asarray(grad_hard), np.asarray(grad_soft), rtol=1e-6)


# --- Schedules, KL and the loss --------------------------------------------------------------


def test_schedules_follow_their_formulas():
    config = _config(temperature_start=1.0, temperature_end=1 / 16,
                     temperature_anneal_fraction=0.5, kl_weight=0.3, kl_warmup_fraction=0.1)
    method = methods.create(config, None, total_steps=1000)
    for step in (0, 1, 100, 250, 499, 500, 501, 1000):
        t = min(step / 500, 1.0)
        tau = 1 / 16 + (1 - 1 / 16) * 0.5 * (1 + math.cos(math.pi * t))
        beta = 0.3 * 0.5 * (1 - math.cos(math.pi * min(step / 100, 1.0)))
        np.testing.assert_allclose(float(method.temperature_schedule(step)), tau, rtol=1e-6)
        np.testing.assert_allclose(float(method.kl_weight_schedule(jnp.asarray(step))), beta,
                                   rtol=1e-6, atol=1e-7)
    assert float(method.temperature_schedule(0)) == 1.0
    np.testing.assert_allclose(float(method.temperature_schedule(700)), 1 / 16, rtol=1e-6)
    # No known run length (evaluation jobs) or a zero share: the final values from step 0.
    unknown = methods.create(config, None)
    np.testing.assert_allclose(float(unknown.temperature_schedule(0)), 1 / 16, rtol=1e-6)
    np.testing.assert_allclose(float(unknown.kl_weight_schedule(0)), 0.3, rtol=1e-6)


def test_kl_to_uniform_and_code_usage_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 4, 8)).astype(np.float32) * 2
    q = _np_softmax(logits.astype(np.float64))
    expected = np.mean(np.sum(q * np.log(q * 8), -1))
    np.testing.assert_allclose(float(dvae.kl_to_uniform(jnp.asarray(logits))), expected,
                               rtol=1e-5)
    assert abs(float(dvae.kl_to_uniform(jnp.zeros((2, 8))))) < 1e-6  # uniform q: KL 0
    mean = q.reshape(-1, 8).mean(0)
    perplexity, unused = dvae.code_usage(jnp.asarray(logits))
    np.testing.assert_allclose(float(perplexity), np.exp(-np.sum(mean * np.log(mean))), rtol=1e-5)
    assert float(unused) == 8 - len(np.unique(np.argmax(logits, -1)))
    # One token everywhere: perplexity 1, V - 1 unused.
    peaked = jnp.zeros((2, 3, 3, 8)).at[..., 5].set(100.0)
    perplexity, unused = dvae.code_usage(peaked)
    np.testing.assert_allclose(float(perplexity), 1.0, rtol=1e-4)
    assert float(unused) == 7


def test_loss_against_numpy():
    rng = np.random.default_rng(1)
    recon, images = (rng.normal(size=(2, 8, 8, 3)).astype(np.float32) for _ in range(2))
    logits = rng.normal(size=(2, 4, 4, 16)).astype(np.float32)
    q = _np_softmax(logits.astype(np.float64))
    mse = np.mean((recon - images) ** 2)
    kl = np.mean(np.sum(q * (np.log(q) + np.log(16)), -1))
    loss, metrics = dvae.dvae_loss(jnp.asarray(recon), jnp.asarray(images), jnp.asarray(logits),
                                   0.25)
    np.testing.assert_allclose(float(loss), mse + 0.25 * kl, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["recon_mse"]), mse, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-5)


# --- The model and the tokenizer API ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """``(method, params)`` of the runlocal dVAE (V=16, 8x8 grid on 16 px), initialised once.

    With an 'rbg' key: XLA on CPU compiles threefry's bits for every distinct parameter shape
    slowly (about 1-2 s each), rbg's in well under a second in all."""
    method = methods.create(_config(straight_through=True), None, total_steps=10)
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), np.uint8)
    params, extra = jax.jit(method.init)(jax.random.key(0, impl="rbg"),
                                         {"image": jnp.asarray(images)})
    assert extra == {} and set(params) == {"dvae"}
    return method, params


@pytest.mark.parametrize("num_downsample,size", [(1, 16), (2, 16), (3, 24)])
def test_model_shapes_and_eval_encoder_shares_params(num_downsample, size):
    model = DiscreteVAE(vocab_size=32, hidden_dim=8, codebook_dim=6,
                        num_downsample=num_downsample, num_res_blocks=2)
    encoder = DVAEEncoder(32, 8, num_downsample, 2)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)

    def run(x):  # shapes only (jax.eval_shape): nothing compiles
        variables = model.init(jax.random.key(1), x)
        logits = model.apply(variables, x, method="logits")
        codes = jax.nn.one_hot(jnp.argmax(logits, -1), 32)
        recon = model.apply(variables, codes, method="decode")
        features = encoder.apply({"params": variables["params"]["encoder"]}, x, train=False)
        return variables, logits, recon, features

    variables, logits, recon, features = jax.eval_shape(run, x)
    g = size // 2**num_downsample
    assert logits.shape == (2, g, g, 32) and logits.dtype == jnp.float32
    assert recon.shape == (2, size, size, 3)
    # The decoder's 1x1 codebook conv of one-hot codes is a lookup of kernel rows.
    assert variables["params"]["decoder"]["codebook"]["kernel"].shape == (1, 1, 32, 6)
    assert "bias" not in variables["params"]["decoder"]["codebook"]
    assert features.shape == (2, encoder.num_features) == (2, 8 * 2**num_downsample)
    assert len([k for k in variables["params"]["encoder"] if k.startswith("groups_")]) == (
        2 * (num_downsample + 1))
    odd = jax.ShapeDtypeStruct((2, size - 1, size - 1, 3), jnp.float32)
    with pytest.raises(ValueError, match="not divisible"):
        jax.eval_shape(lambda x: model.init(jax.random.key(1), x), odd)


def test_token_ids_are_the_argmax_of_the_logits(tiny):
    method, params = tiny
    assert (method.image_size, method.grid, method.vocab_size) == (16, 8, 16)
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    ids = jax.jit(method.token_ids)(params, x)
    assert ids.shape == (4, 64) and ids.dtype == jnp.int32
    assert int(ids.min()) >= 0 and int(ids.max()) < 16
    logits = method.model.apply({"params": params["dvae"]}, x, method="logits")
    np.testing.assert_array_equal(np.asarray(ids),
                                  np.argmax(np.asarray(logits), -1).reshape(4, 64))  # row-major
    panels = method.picture_panels(params, {}, x, jax.random.key(0))
    assert list(panels) == ["original", "reconstruction"]
    # The picture's reconstruction is the decoder on the one-hot hard codes.
    codes = jax.nn.one_hot(jnp.argmax(logits, -1), 16)
    recon = method.model.apply({"params": params["dvae"]}, codes, method="decode")
    np.testing.assert_allclose(np.asarray(panels["reconstruction"]),
                               np.asarray(augment.denormalize(recon)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(method.decode_tokens(params, ids)), np.asarray(recon),
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(panels["original"]),
                               np.asarray(augment.denormalize(x)), atol=1e-6)


def test_usage_statistics_and_figure():
    counts = np.array([5, 0, 5, 0])
    stats = tokenizer.usage_statistics(counts)
    assert stats["unused_tokens"] == 2 and stats["tokens_used"] == 2
    np.testing.assert_allclose(stats["code_perplexity"], 2.0)
    for vocab in (16, 8192):  # one bar per token, or bins when V exceeds the plot's width
        picture = tokenizer.usage_figure(np.arange(vocab) % 7, title="t")
        assert picture.size == (tokenizer.PLOT_WIDTH + 2 * tokenizer.MARGIN,
                                2 * (tokenizer.PLOT_HEIGHT + 2 * tokenizer.MARGIN))


# --- The step on 1 and 8 devices, bad configs, train -> evaluate -----------------------------


def _one_step(num_devices, params):
    mesh = parallel.make_mesh(devices=jax.devices()[:num_devices])
    method = methods.create(_config(straight_through=True), mesh, total_steps=10)
    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    return loss_step(method, params, {}, images, mesh, step=4)


def test_step_same_on_1_and_8_devices(tiny):
    _, params = tiny
    loss1, grads1, metrics1 = _one_step(1, params)
    loss8, grads8, metrics8 = _one_step(8, params)
    assert np.isfinite(loss1)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for key in ("recon_mse", "kl", "perplexity", "unused_tokens", "temperature", "kl_weight"):
        np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=1e-5, err_msg=key)
    assert_grads_close(grads8, grads1)


@pytest.mark.parametrize("key,value,match", [
    ("dvae.num_downsample", 5, "aug.view1.size"),  # 16 px is not divisible by 32
    ("aug.view1.size", 17, "aug.view1.size"),
    ("dvae.num_downsample", 0, "dvae.num_downsample"),
    ("dvae.vocab_size", 1, "dvae.vocab_size"),
    ("dvae.hidden_dim", 0, "dvae.hidden_dim"),
    ("dvae.temperature_end", 2.0, "dvae.temperature_end"),
    ("dvae.temperature_end", 0.0, "dvae.temperature_end"),
    ("dvae.temperature_start", -1.0, "dvae.temperature_start"),
    ("dvae.temperature_anneal_fraction", 1.5, "dvae.temperature_anneal_fraction"),
    ("dvae.kl_warmup_fraction", -0.1, "dvae.kl_warmup_fraction"),
    ("dvae.kl_weight", -1.0, "dvae.kl_weight"),
    ("dvae.dtype", "float99", "dvae.dtype"),
])
def test_bad_config_named_before_compile(key, value, match):
    config = dvae_config.get_config("data=digits,runlocal")
    with config.unlocked():
        set_key(config, key, value)
    with pytest.raises(ConfigError, match=match):
        methods.create(config, parallel.make_mesh())


def test_presets_match_the_vit_grids():
    for data, grid, vocab in (("digits", 8, 128), ("cifar10", 8, 512),
                              ("imagenet2012", 14, 8192)):
        config = dvae_config.get_config(f"data={data}")
        method = dvae.DVAE(config, None)
        assert (method.grid, method.vocab_size) == (grid, vocab), data
    assert dvae_config.get_config("data=imagenet2012").aug.view1.size == 112


def test_train_then_evaluate_writes_pictures(tmp_path):
    config = dvae_config.get_config("data=digits,runlocal")
    with config.unlocked():
        config.total_steps = 3
        config.eval.random_init_baseline = False
    train.train(config, str(tmp_path))
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all(k in rows[-1] for k in ("recon_mse", "kl", "temperature", "kl_weight",
                                       "perplexity", "unused_tokens", "hard_recon_mse"))
    results = evaluate_main.evaluate(str(tmp_path))
    assert results["ssl"]["linear_top1"] > 0.2  # chance: 0.1
    assert results["ssl"]["feature_dim"] == 16  # hidden_dim 8 x 2**1
    picture = Image.open(results["reconstruction_picture"])
    assert picture.size == (2 * 96 + 2, 4 * 96 + 3 * 2)  # original | reconstruction
    tokens = results["tokenizer"]
    assert tokens["num_test"] == config.eval.max_test_examples
    assert tokens["tokens_used"] + tokens["unused_tokens"] == 16
    assert 1.0 <= tokens["code_perplexity"] <= 16.0 and tokens["hard_recon_mse"] > 0
    assert Image.open(tokens["token_usage_picture"]).size[0] > 0
    assert tokens["token_usage_picture"].endswith("token_usage_step3.png")
    assert "tokenizer" in evaluate_main.format_table(results)

"""Colorization: sRGB <-> Lab against scikit-image, the ab bins (in gamut), the soft encoding and
the class rebalancing against a NumPy transcription of the paper, the loss, the encoder's grey
input, the same step on 1 and 8 devices, a run with its evaluation picture, and bad input (a
greyscale source among it)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from skimage.color import lab2rgb, rgb2lab

from configs import colorization as colorization_config
from ssl_jax import methods, parallel, train
from ssl_jax.config import ConfigError
from ssl_jax.data import color
from ssl_jax.evaluate import __main__ as evaluate_main
from ssl_jax.methods import colorization as col
from tests.method_steps import assert_train_refuses, set_key, step_on_1_and_8_devices

RUNLOCAL = "data=cifar10,runlocal"


def _colour_folder(root, n=24, side=32, grey=False):
    """root/{train,test}/cK/*.png of random colour (or greyscale) images, 3 classes."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for i in range(n):
            path = os.path.join(root, split, f"c{i % 3}", f"{i}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shape = (side, side) if grey else (side, side, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return str(root)


def test_lab_matches_scikit_image_both_ways():
    rng = np.random.default_rng(0)
    rgb = np.concatenate([rng.random((2000, 3)), np.eye(3), [[0, 0, 0], [1, 1, 1], [1, 1, 0]],
                          [[0.01, 0.02, 0.03]]])
    lab = np.asarray(jax.jit(color.rgb_to_lab)(jnp.asarray(rgb, jnp.float32)))
    np.testing.assert_allclose(lab, rgb2lab(rgb[None])[0], atol=2e-3)
    back = np.asarray(jax.jit(color.lab_to_rgb)(jnp.asarray(lab)))
    np.testing.assert_allclose(back, rgb, atol=1e-4)  # the round trip
    # Any Lab, out of gamut included (clipped as scikit-image clips).
    any_lab = np.stack([rng.uniform(0, 100, 2000), rng.uniform(-120, 120, 2000),
                        rng.uniform(-120, 120, 2000)], -1)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = lab2rgb(any_lab[None])[0]
    np.testing.assert_allclose(np.asarray(color.lab_to_rgb(jnp.asarray(any_lab))), expected,
                               atol=1e-4)


def test_ab_bins_are_the_cells_srgb_reaches():
    bins = col.ab_bins(10)
    levels = np.append(np.arange(0, 256, 4), 255) / 255.0
    lattice = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    reached = {tuple(c) for c in np.round(rgb2lab(lattice[None])[0][:, 1:] / 10).astype(int)}
    assert {tuple(c) for c in (bins / 10).astype(int)} == reached
    np.testing.assert_array_equal(bins % 10, 0)
    # Every 8-bit colour (a random sample, through scikit-image) falls into one of the bins.
    sample = np.random.default_rng(1).integers(0, 256, (20000, 3)) / 255.0
    cells = np.round(rgb2lab(sample[None])[0][:, 1:] / 10).astype(int)
    assert {tuple(c) for c in cells} <= reached


def test_soft_encoding_is_the_normalised_gaussian_of_the_nearest_bins():
    bins = col.ab_bins(10)
    ab = np.random.default_rng(2).uniform(-80, 80, (50, 2)).astype(np.float32)
    idx, w = col.soft_encode(jnp.asarray(ab), jnp.asarray(bins), sigma=5.0, k=5)
    idx, w = np.asarray(idx), np.asarray(w)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    d2 = ((ab[:, None] - bins[None]) ** 2).sum(-1)
    for i in range(len(ab)):
        near = np.argsort(d2[i], kind="stable")[:5]
        assert set(idx[i]) == set(near) and idx[i, 0] == near[0]
        g = np.exp(-d2[i, idx[i]] / (2 * 5.0**2))
        np.testing.assert_allclose(w[i], g / g.sum(), rtol=1e-4, atol=1e-6)


def _numpy_weights(counts, bins, sigma=5.0, lam=0.5):
    """The paper's procedure, transcribed: empirical p, Gaussian smoothing over ab (each bin's
    mass spread over the bins and renormalised), mixed with uniform, reciprocal, E_p~[w] = 1."""
    p = counts / counts.sum()
    smoothed = np.zeros_like(p)
    for r in range(len(bins)):
        g = np.exp(-((bins - bins[r]) ** 2).sum(-1) / (2 * sigma**2))
        smoothed += p[r] * g / g.sum()
    w = 1.0 / ((1 - lam) * smoothed + lam / len(bins))
    return w / (smoothed * w).sum(), smoothed


def test_rebalancing_weights_match_numpy_transcription():
    bins = col.ab_bins(10)
    counts = np.random.default_rng(3).poisson(3.0, len(bins)).astype(np.float32)
    counts[:20] = 500.0  # a peaked prior: rare colours get larger weights
    expected, smoothed = _numpy_weights(counts, bins)
    kernel = col.smoothing_kernel(jnp.asarray(bins), 5.0)
    prior = col.smoothed_prior(jnp.asarray(counts), kernel)
    np.testing.assert_allclose(np.asarray(prior), smoothed, rtol=1e-4, atol=1e-8)
    w = np.asarray(col.rebalance_weights(prior, 0.5))
    np.testing.assert_allclose(w, expected, rtol=1e-4)
    np.testing.assert_allclose((smoothed * w).sum(), 1.0, rtol=1e-5)
    # Nothing counted yet: a uniform prior, every weight 1.
    empty = col.smoothed_prior(jnp.zeros(len(bins)), kernel)
    np.testing.assert_allclose(np.asarray(col.rebalance_weights(empty, 0.5)), 1.0, rtol=1e-5)


def test_classification_loss_and_prior_counts_against_numpy():
    config = colorization_config.get_config(RUNLOCAL)
    with config.unlocked():
        config.colorization.prior_steps = 3
    method = methods.create(config, None)
    bins = np.asarray(method.bins)
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 4, 4, len(bins))).astype(np.float32)
    target = rng.uniform(-60, 60, (2, 4, 4, 2)).astype(np.float32)
    counts = rng.poisson(2.0, len(bins)).astype(np.float32)
    loss, metrics, new_counts = method.classification_loss(
        jnp.asarray(logits), jnp.asarray(target), jnp.asarray(counts), 0)
    # NumPy: soft targets over the 5 nearest bins, weight of the nearest bin, prior incl. batch.
    flat_ab, flat_logits = target.reshape(-1, 2), logits.reshape(-1, len(bins))
    d2 = ((flat_ab[:, None] - bins[None]) ** 2).sum(-1)
    near = np.argsort(d2, axis=1, kind="stable")[:, :5]
    expected_counts = counts + np.bincount(near[:, 0], minlength=len(bins))
    np.testing.assert_allclose(np.asarray(new_counts), expected_counts)
    w, _ = _numpy_weights(expected_counts, bins)
    log_p = flat_logits - np.log(np.exp(flat_logits).sum(-1, keepdims=True))
    total = 0.0
    for i in range(len(flat_ab)):
        g = np.exp(-d2[i, near[i]] / 50.0)
        total += w[near[i, 0]] * -(g / g.sum() * log_p[i, near[i]]).sum()
    np.testing.assert_allclose(float(loss), total / len(flat_ab), rtol=1e-4)
    assert float(metrics["bin_accuracy"]) == np.mean(flat_logits.argmax(-1) == near[:, 0])
    # Past prior_steps the counts stay as they were.
    _, _, frozen = method.classification_loss(jnp.asarray(logits), jnp.asarray(target),
                                              jnp.asarray(counts), 3)
    np.testing.assert_array_equal(np.asarray(frozen), counts)


def test_encoder_sees_the_lightness_of_the_image():
    method = methods.create(colorization_config.get_config(RUNLOCAL), None)
    rgb = np.random.default_rng(5).random((2, 8, 8, 3)).astype(np.float32)
    normalised = (rgb - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    x = np.asarray(method.encoder_input(jnp.asarray(normalised, jnp.float32)))
    assert x.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(x[..., 0], (rgb2lab(rgb)[..., 0] - 50) / 50, atol=1e-4)


def test_step_same_on_1_and_8_devices_vit():
    config = colorization_config.get_config(RUNLOCAL + ",model=vit_ti4")
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    results = step_on_1_and_8_devices(config, images, stat_keys=("ab_counts",))
    extra = results[0][3]
    assert float(np.sum(extra["ab_counts"])) == 16 * 8 * 8  # every target pixel counted once


def test_train_then_evaluate_writes_colorization_picture(tmp_path):
    config = colorization_config.get_config(RUNLOCAL)
    with config.unlocked():
        config.data.update(name="folder", root=_colour_folder(tmp_path / "data"), num_workers=0)
        config.total_steps = 2
        config.eval.update(random_init_baseline=False, probe_epochs=2)
    train.train(config, str(tmp_path / "run"))
    results = evaluate_main.evaluate(str(tmp_path / "run"))
    assert results["ssl"]["feature_dim"] == 64  # the encoder ran on the grey input
    picture = np.asarray(Image.open(results["reconstruction_picture"]).convert("RGB"))
    assert picture.shape == (4 * 96 + 3 * 2, 3 * 96 + 2 * 2, 3)  # grey | prediction | original
    grey, original = picture[:96, :96].astype(int), picture[:96, 196:].astype(int)
    assert np.abs(grey[..., 0] - grey[..., 1]).max() <= 2  # the L-only column has no colour
    assert np.abs(original[..., 0] - original[..., 1]).max() > 20


def test_greyscale_sources_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="config.data.name='folder' is a single-channel"):
        config = colorization_config.get_config(RUNLOCAL)
        with config.unlocked():
            config.data.update(name="folder", root=_colour_folder(tmp_path, n=3, grey=True))
        methods.create(config, None)
    # The built-in digits (8x8 greyscale), from the command line: exit code 2, before compiling.
    assert_train_refuses(tmp_path, "configs/colorization.py:data=digits,runlocal",
                         "--config.seed=1", "config.data.name='digits' is a single-channel")


@pytest.mark.parametrize("key,value", [
    ("colorization.loss", "l1"), ("colorization.target_stride", 3),
    ("colorization.rebalance_lambda", 1.5), ("colorization.num_neighbours", 0),
    ("colorization.ab_grid", 2), ("colorization.sigma", 0.0),
])
def test_bad_config_named_before_compile(key, value):
    config = colorization_config.get_config(RUNLOCAL)
    with config.unlocked():
        set_key(config, key, value)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        methods.create(config, parallel.make_mesh())

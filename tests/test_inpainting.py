"""Inpainting (context encoder): the holes and the loss weights against NumPy, a loss that depends
on the hole only, an encoder that never sees the hole, the same step on 1 and 8 devices, a run
with its evaluation picture, and bad input (a hole larger than the image among it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import inpainting as inpainting_config
from ssl_jax import methods, parallel, train
from ssl_jax.config import ConfigError
from ssl_jax.evaluate import __main__ as evaluate_main
from ssl_jax.methods import inpainting as inp
from tests.method_steps import assert_train_refuses, set_key, step_on_1_and_8_devices

RUNLOCAL = "data=digits,runlocal"


def _numpy_weights(hole, overlap, weight):
    """1 in the hole, ``weight`` within Chebyshev distance ``overlap`` of it, else 0."""
    out = hole.astype(np.float64).copy()
    b, s, _ = hole.shape
    for n in range(b):
        for i in range(s):
            for j in range(s):
                window = hole[n, max(i - overlap, 0):i + overlap + 1,
                              max(j - overlap, 0):j + overlap + 1]
                if not hole[n, i, j] and window.any():
                    out[n, i, j] = weight
    return out


def test_center_hole_and_overlap_ring_against_numpy():
    hole = np.asarray(inp.center_hole(2, 16, 6))
    expected = np.zeros((16, 16), bool)
    expected[5:11, 5:11] = True
    np.testing.assert_array_equal(hole, np.broadcast_to(expected, (2, 16, 16)))
    weights = np.asarray(inp.loss_weights(jnp.asarray(hole), 2, 10.0))
    np.testing.assert_allclose(weights, _numpy_weights(hole, 2, 10.0))
    assert weights.sum() == 2 * (36 + 10 * (100 - 36))  # 6x6 hole inside a 10x10 ring


def test_random_blocks_per_example_union_of_squares():
    holes = np.asarray(inp.random_blocks(jax.random.key(0), 64, 16, 3, 4))
    again = np.asarray(inp.random_blocks(jax.random.key(0), 64, 16, 3, 4))
    np.testing.assert_array_equal(holes, again)  # a function of the key
    assert len({h.tobytes() for h in holes}) > 32  # every example its own blocks
    areas = holes.reshape(64, -1).sum(1)
    assert areas.min() >= 16 and areas.max() <= 48
    for h in holes:  # every masked pixel lies in some fully masked 4x4 square
        full = np.array([[h[i:i + 4, j:j + 4].all() for j in range(13)] for i in range(13)])
        covered = np.zeros_like(h)
        for i, j in zip(*np.nonzero(full), strict=True):
            covered[i:i + 4, j:j + 4] = True
        np.testing.assert_array_equal(covered, h)


@pytest.mark.parametrize("overlap", [0, 1])
def test_loss_depends_only_on_the_hole_and_its_ring(overlap):
    rng = np.random.default_rng(1)
    hole = inp.random_blocks(jax.random.key(1), 4, 16, 2, 5)
    weights = inp.loss_weights(hole, overlap, 10.0)
    pred = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    target = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    loss = float(inp.inpainting_loss(jnp.asarray(pred), jnp.asarray(target), weights))
    w = _numpy_weights(np.asarray(hole), overlap, 10.0)
    expected = (w * ((pred - target) ** 2).mean(-1)).sum() / w.sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    outside = (w == 0)[..., None]
    changed = np.where(outside, pred + 100.0, pred)  # predictions away from the hole
    np.testing.assert_allclose(
        float(inp.inpainting_loss(jnp.asarray(changed), jnp.asarray(target), weights)), loss,
        rtol=1e-6)
    inside = np.where(np.asarray(hole)[..., None], pred + 1.0, pred)
    assert float(inp.inpainting_loss(jnp.asarray(inside), jnp.asarray(target), weights)) != loss


def test_encoder_does_not_see_the_hole():
    method = methods.create(inpainting_config.get_config(RUNLOCAL), None)
    rng = np.random.default_rng(2)
    images = jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32)
    params, extra = method.init(jax.random.key(0), {"image": jnp.zeros((3, 16, 16, 3))})
    hole = method.holes(jax.random.key(1), 3)
    run = jax.jit(lambda x: method.reconstruct(params, extra["encoder"], x, hole, False)[0])
    pred = np.asarray(run(images))
    h = np.asarray(hole)[..., None]
    noise = rng.normal(size=images.shape).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(run(images + 5.0 * h * noise)), pred)
    assert not np.allclose(np.asarray(run(images + 5.0 * (1 - h) * noise)), pred, atol=1e-3)


def test_step_same_on_1_and_8_devices():
    config = inpainting_config.get_config(RUNLOCAL + ",mask=blocks")
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    step_on_1_and_8_devices(config, images, stat_keys=("encoder",))


def test_vit_train_then_evaluate_writes_inpainting_picture(tmp_path):
    config = inpainting_config.get_config(RUNLOCAL + ",model=vit_ti4")
    with config.unlocked():
        config.total_steps = 2
        config.eval.update(random_init_baseline=False, probe_epochs=2)
    train.train(config, str(tmp_path))
    results = evaluate_main.evaluate(str(tmp_path))
    picture = np.asarray(Image.open(results["reconstruction_picture"]).convert("RGB"))
    assert picture.shape == (4 * 96 + 3 * 2, 3 * 96 + 2 * 2, 3)  # masked | filled | original
    # The 6-px hole of a 16-px view: 36 of 256 source pixels, grey in the first column only.
    masked, filled = picture[:96, :96], picture[:96, 98:194]
    assert abs(np.mean(np.all(masked == 128, axis=-1)) - 36 / 256) < 0.02
    assert np.mean(np.all(filled == 128, axis=-1)) < 0.05


@pytest.mark.parametrize("key,value,match", [
    ("inpainting.hole_size", 17, "inpainting.hole_size"),
    ("inpainting.hole_size", 16, "inpainting.hole_size"),
    ("inpainting.overlap", -1, "inpainting.overlap"),
    ("inpainting.mask_kind", "region", "inpainting.mask_kind"),
])
def test_bad_config_named_before_compile(key, value, match):
    config = inpainting_config.get_config(RUNLOCAL)
    with config.unlocked():
        set_key(config, key, value)
    with pytest.raises(ConfigError, match=match):
        methods.create(config, parallel.make_mesh())
    config = inpainting_config.get_config(RUNLOCAL + ",mask=blocks")
    with config.unlocked():
        config.inpainting.block_size = 16
    with pytest.raises(ConfigError, match="inpainting.block_size"):
        methods.create(config, None)


def test_hole_larger_than_the_image_exits_2(tmp_path):
    assert_train_refuses(tmp_path, "configs/inpainting.py:data=digits,runlocal",
                         "--config.inpainting.hole_size=40",
                         "config.inpainting.hole_size: 40 px plus the 1-px overlap")

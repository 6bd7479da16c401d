"""MAE: patchify round trip, masks (exact ratio, restore permutation, block and grid patterns),
an encoder that sees only the visible patches, the loss on masked patches against NumPy, the
same step on 1 and 8 devices, bad input, and the reconstruction picture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import mae as mae_config
from ssl_jax import methods, parallel, train
from ssl_jax.config import ConfigError
from ssl_jax.data import masking
from ssl_jax.evaluate import __main__ as evaluate_main
from ssl_jax.methods import mae
from ssl_jax.methods.ssl_math import unpatchify
from ssl_jax.models.vit import vit
from tests.method_steps import assert_grads_close, loss_step, set_key


@pytest.mark.parametrize("kind", masking.MASK_KINDS)
def test_mask_exact_ratio_and_restore_permutation(kind):
    batch, grid, ratio = 8, (8, 8), 0.75
    n = grid[0] * grid[1]
    ids_keep, mask, ids_restore = masking.shuffle_mask(jax.random.key(1), batch, grid, ratio,
                                                       kind, min_block=4)
    ids_keep, mask, ids_restore = map(np.asarray, (ids_keep, mask, ids_restore))
    assert ids_keep.shape == (batch, 16)
    np.testing.assert_array_equal(mask.sum(axis=1), np.full(batch, 48))
    for b in range(batch):
        assert sorted(ids_restore[b]) == list(range(n))  # a permutation
        np.testing.assert_array_equal(mask[b, ids_keep[b]], 0)  # kept patches are unmasked
        # [visible tokens; mask tokens] gathered with ids_restore is back in patch order:
        # every visible token at its own patch, mask tokens (-1) at the masked patches.
        sequence = np.concatenate([ids_keep[b], np.full(n - len(ids_keep[b]), -1)])
        restored = sequence[ids_restore[b]]
        np.testing.assert_array_equal(restored[ids_keep[b]], ids_keep[b])
        np.testing.assert_array_equal(restored[mask[b] > 0], -1)
    masks = mask.reshape(batch, *grid)
    if kind == "grid":  # the top-left patch of every 2x2 cell is visible, the rest masked
        expected = np.ones(grid)
        expected[::2, ::2] = 0
        np.testing.assert_array_equal(masks, np.broadcast_to(expected, masks.shape))
    if kind == "random":  # different examples get different masks
        assert len({m.tobytes() for m in masks}) == batch


def test_block_mask_meets_count_and_block_constraints():
    grid, target = (14, 14), 75  # BEiT: ~40% of a 14x14 grid
    masks = np.asarray(jax.vmap(lambda k: masking.block_mask(k, grid, target, min_block=16))(
        jax.random.split(jax.random.key(0), 32)))
    counts = masks.reshape(32, -1).sum(axis=1)
    assert counts.max() <= target and counts.min() >= 0.8 * target
    # Blocks of >= 16 patches: no masked patch is isolated (each has a masked 4-neighbour).
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
    neighbours = (padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2]
                  | padded[:, 1:-1, 2:])
    assert not np.any(masks & ~neighbours)
    with pytest.raises(ValueError, match="num_masked"):
        masking.block_mask(jax.random.key(0), grid, 0)


def test_bad_mask_ratios():
    for ratio in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="must be in"):
            masking.num_masked_patches(64, ratio)
    with pytest.raises(ValueError, match="visible"):
        masking.num_masked_patches(4, 0.9)


def test_encoder_sees_only_visible_patches():
    model = vit("ti", 4, depth=2, image_size=16, pos_embed="sincos")
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), images, train=False)
    ids_keep, mask, _ = masking.shuffle_mask(jax.random.key(2), 3, (4, 4), 0.75)
    tokens = model.apply(variables, images, train=False, return_tokens=True, ids_keep=ids_keep)
    assert tokens.shape == (3, 1 + 4, 192)
    # Changing the pixels of masked patches changes nothing; changing a visible one does.
    pixel_mask = unpatchify(jnp.broadcast_to(mask[:, :, None], (3, 16, 48)), 4, (4, 4))
    noisy = images + 5.0 * pixel_mask * jnp.asarray(rng.normal(size=images.shape), jnp.float32)
    again = model.apply(variables, noisy, train=False, return_tokens=True, ids_keep=ids_keep)
    np.testing.assert_allclose(np.asarray(again), np.asarray(tokens), atol=1e-5)
    visible_change = images + 5.0 * (1 - pixel_mask)
    changed = model.apply(variables, visible_change, train=False, return_tokens=True,
                          ids_keep=ids_keep)
    assert not np.allclose(np.asarray(changed), np.asarray(tokens), atol=1e-3)


def test_loss_counts_masked_patches_only():
    rng = np.random.default_rng(3)
    pred = rng.normal(size=(4, 16, 12)).astype(np.float32)
    pixels = rng.normal(size=(4, 16, 12)).astype(np.float32)
    mask = np.zeros((4, 16), np.float32)
    for b in range(4):
        mask[b, rng.permutation(16)[:12]] = 1
    # NumPy transcription of MAE's forward_loss with norm_pix_loss.
    mean = pixels.mean(-1, keepdims=True)
    var = pixels.var(-1, keepdims=True, ddof=1)
    target = (pixels - mean) / (var + 1e-6) ** 0.5
    expected = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    target_jax = mae.patch_targets(jnp.asarray(pixels), norm_pix=True)
    loss, metrics = mae.mae_loss(jnp.asarray(pred), target_jax, jnp.asarray(mask))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["mask_ratio"]) == 0.75
    # Predictions at visible patches do not change the loss.
    pred2 = np.where(mask[:, :, None] > 0, pred, 100.0)
    loss2, _ = mae.mae_loss(jnp.asarray(pred2), target_jax, jnp.asarray(mask))
    np.testing.assert_allclose(float(loss2), expected, rtol=1e-5)
    raw = mae.patch_targets(jnp.asarray(pixels), norm_pix=False)
    np.testing.assert_array_equal(np.asarray(raw), pixels)


def _one_step(num_devices):
    mesh = parallel.make_mesh(devices=jax.devices()[:num_devices])
    method = methods.create(mae_config.get_config("data=digits,runlocal"), mesh)
    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    params, extra = method.init(jax.random.key(0), {"image": jnp.asarray(images)})
    return loss_step(method, params, extra, images, mesh)


def test_step_same_on_1_and_8_devices():
    loss1, grads1, metrics1 = _one_step(1)
    loss8, grads8, metrics8 = _one_step(8)
    assert np.isfinite(loss1) and float(metrics1["mask_ratio"]) == 0.75
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    assert_grads_close(grads8, grads1)


@pytest.mark.parametrize("key,value,match", [
    ("mae.mask_ratio", 0.0, "mae.mask_ratio"),
    ("mae.mask_ratio", 1.0, "mae.mask_ratio"),
    ("mae.mask_kind", "checkerboard", "mae.mask_kind"),
    ("aug.view1.size", 18, "aug.view1.size"),
    ("mae.decoder_dim", 30, "mae.decoder_dim"),
])
def test_bad_config_named_before_compile(key, value, match):
    config = mae_config.get_config("data=digits,runlocal")
    with config.unlocked():
        set_key(config, key, value)
    with pytest.raises(ConfigError, match=match):
        methods.create(config, parallel.make_mesh())


def test_resnet_is_refused():
    config = mae_config.get_config("data=digits,runlocal")
    with config.unlocked():
        config.model = dict(name="resnet18", width_multiplier=0.125, cifar_stem=True)
    with pytest.raises(ConfigError, match="model.name"):
        methods.create(config, parallel.make_mesh())


def test_train_then_evaluate_writes_reconstruction_picture(tmp_path):
    config = mae_config.get_config("data=digits,runlocal")
    with config.unlocked():
        config.total_steps = 2
        config.eval.random_init_baseline = False
    train.train(config, str(tmp_path))
    results = evaluate_main.evaluate(str(tmp_path))
    assert results["ssl"]["linear_top1"] > 0.2  # chance: 0.1
    picture = Image.open(results["reconstruction_picture"])
    # 4 test images (rows) x (original, masked, reconstruction) columns of 96-px tiles.
    assert picture.size == (3 * 96 + 2 * 2, 4 * 96 + 3 * 2)
    # Columns in the method's order: original, masked (masked patches exactly grey), ...
    pixels = np.asarray(picture.convert("RGB"))
    grey = [np.mean(np.all(pixels[:96, c * 98:c * 98 + 96] == 128, axis=-1)) for c in range(3)]
    assert grey[1] >= 0.5 and grey[0] < 0.5

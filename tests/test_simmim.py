"""SimMIM: the mask drawn at the mask-patch scale and upsampled to the model's grid, the L1 loss on
masked pixels only against a NumPy transcription of SimMIM's forward, masked patches that do not
reach the encoder, the same step on 1 and 8 devices, bad input (a clear error naming the key
before compiling, exit code 2), and a run that the evaluation job (MAE's reconstruction picture)
and the fine-tuning job take without a change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import simmim as simmim_config
from ssl_jax import finetune, methods, parallel, train
from ssl_jax.config import ConfigError
from ssl_jax.data import masking
from ssl_jax.evaluate import __main__ as evaluate_main
from ssl_jax.methods import simmim
from ssl_jax.methods.ssl_math import patchify
from tests.method_steps import assert_train_refuses, set_key, step_on_1_and_8_devices

RUNLOCAL = "data=digits,runlocal"  # 16-px views, ViT-Ti/2 (8x8 grid), 4-px mask patches


def _images(n=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


@pytest.mark.parametrize("size,mask_patch,patch,ratio", [(32, 8, 4, 0.6), (224, 32, 16, 0.6),
                                                         (16, 4, 2, 0.5)])
def test_mask_drawn_at_mask_patch_scale_and_upsampled(size, mask_patch, patch, ratio):
    """SimMIM's MaskGenerator: ceil(M * ratio) of the M mask patches, each repeated over the
    (mask_patch / patch)^2 model patches it covers; a different draw per example."""
    batch, side, scale = 6, size // mask_patch, mask_patch // patch
    mask = np.asarray(masking.mask_patch_mask(jax.random.key(0), batch, size, mask_patch, patch,
                                              ratio))
    assert mask.shape == (batch, (size // patch) ** 2) and mask.dtype == bool
    fine = mask.reshape(batch, side * scale, side * scale)
    coarse = fine[:, ::scale, ::scale]
    np.testing.assert_array_equal(fine, coarse.repeat(scale, axis=1).repeat(scale, axis=2))
    np.testing.assert_array_equal(coarse.reshape(batch, -1).sum(1),
                                  np.full(batch, int(np.ceil(side * side * ratio))))
    assert len({m.tobytes() for m in coarse}) == batch
    with pytest.raises(ValueError, match="tile"):
        masking.mask_patch_mask(jax.random.key(0), 1, size, mask_patch + 1, patch, ratio)


def simmim_forward_loss_numpy(x, x_rec, mask, patch):
    """SimMIM.forward's loss: x, x_rec ``[B, C, H, W]``, mask ``[B, H/p, W/p]`` (1 = masked)."""
    pixel_mask = mask.repeat(patch, 1).repeat(patch, 2)[:, None]  # [B, 1, H, W]
    loss_recon = np.abs(x - x_rec)
    return (loss_recon * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / x.shape[1]


def test_l1_loss_on_masked_pixels_only_matches_numpy():
    rng = np.random.default_rng(1)
    batch, size, patch = 3, 8, 2
    x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    rec = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    mask = rng.random((batch, size // patch, size // patch)) < 0.6
    loss, metrics = simmim.simmim_loss(patchify(jnp.asarray(rec), patch),
                                       patchify(jnp.asarray(x), patch),
                                       jnp.asarray(mask.reshape(batch, -1)))
    expected = simmim_forward_loss_numpy(x.transpose(0, 3, 1, 2), rec.transpose(0, 3, 1, 2),
                                         mask.astype(np.float32), patch)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["mask_ratio"]), mask.mean(), rtol=1e-6)
    # Predictions of visible pixels do not count.
    pixel_mask = mask.repeat(patch, 1).repeat(patch, 2)[..., None]
    changed = np.where(pixel_mask, rec, rec + 50.0)
    again, _ = simmim.simmim_loss(patchify(jnp.asarray(changed), patch),
                                  patchify(jnp.asarray(x), patch),
                                  jnp.asarray(mask.reshape(batch, -1)))
    np.testing.assert_allclose(float(again), float(loss), rtol=1e-6)


def test_masked_patches_do_not_reach_the_encoder():
    """All tokens enter the encoder, but a masked patch's pixels are replaced by the mask token:
    changing them changes no prediction; changing a visible patch does."""
    method = methods.create(simmim_config.get_config(RUNLOCAL), None)
    params, _ = method.init(jax.random.key(0), {"image": jnp.asarray(_images(2))})
    mask = method.masks(jax.random.key(1), 2)
    x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    pixel_mask = np.asarray(mask).reshape(2, 8, 8).repeat(2, 1).repeat(2, 2)[..., None]
    predict = jax.jit(lambda images: method.predict(params, images, mask, False))
    base = predict(x)
    assert base.shape == (2, 64, 12)
    np.testing.assert_allclose(predict(x + 5.0 * pixel_mask), base, atol=1e-5)
    assert float(jnp.max(jnp.abs(predict(x + 5.0 * (1 - pixel_mask)) - base))) > 1e-2


def test_step_same_on_1_and_8_devices():
    results = step_on_1_and_8_devices(simmim_config.get_config(RUNLOCAL), _images(),
                                      stat_keys=())
    metrics = results[0][2]
    assert float(metrics["mask_ratio"]) == pytest.approx(10 / 16)  # ceil(0.6 * 16) of 16


@pytest.mark.parametrize("key,value,match", [
    ("simmim.mask_patch_size", 3, r"config\.simmim\.mask_patch_size: 3 must be a positive "
                                  r"multiple of the model's patch size 2"),
    ("simmim.mask_patch_size", 12, r"config\.simmim\.mask_patch_size: mask patches of 12 px do "
                                   r"not tile the 16-px view"),
    ("simmim.mask_ratio", 0.0, r"config\.simmim\.mask_ratio"),
    ("simmim.mask_ratio", 1.0, r"config\.simmim\.mask_ratio"),
    ("model.use_mask_token", False, r"config\.model\.use_mask_token"),
])
def test_bad_config_named_before_compile(key, value, match):
    config = simmim_config.get_config(RUNLOCAL)
    with config.unlocked():
        set_key(config, key, value)
    with pytest.raises(ConfigError, match=match):
        methods.create(config, parallel.make_mesh())


def test_resnet_is_refused():
    config = simmim_config.get_config(RUNLOCAL)
    with config.unlocked():
        config.model = dict(name="resnet18", width_multiplier=0.125, cifar_stem=True)
    with pytest.raises(ConfigError, match=r"config\.model\.name: SimMIM needs a ViT"):
        methods.create(config, parallel.make_mesh())


def test_bad_mask_patch_exits_2_before_compiling(tmp_path):
    assert_train_refuses(tmp_path, f"configs/simmim.py:{RUNLOCAL}",
                         "--config.simmim.mask_patch_size=6", "config.simmim.mask_patch_size")


def test_train_evaluate_and_finetune_a_simmim_run(tmp_path):
    config = simmim_config.get_config(RUNLOCAL)
    with config.unlocked():
        config.total_steps = 2
        config.eval.random_init_baseline = False
    train.train(config, str(tmp_path))
    results = evaluate_main.evaluate(str(tmp_path), ["eval.probe_epochs=2"])
    assert results["method"] == "simmim" and np.isfinite(results["ssl"]["linear_top1"])
    picture = Image.open(results["reconstruction_picture"])
    # 4 test images (rows) x (original, masked, reconstruction): MAE's picture.
    assert picture.size == (3 * 96 + 2 * 2, 4 * 96 + 3 * 2)
    pixels = np.asarray(picture.convert("RGB"))
    grey = [np.mean(np.all(pixels[:96, c * 98:c * 98 + 96] == 128, axis=-1)) for c in range(3)]
    assert grey[1] >= 0.5 and grey[0] < 0.5  # 10 of 16 mask patches grey
    out = finetune.finetune(str(tmp_path), "configs/finetune.py:data=digits,runlocal")
    assert out["init"] == "pretrained" and 0.0 <= out["test_top1"] <= 1.0

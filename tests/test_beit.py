"""BEiT: relative position index and bias, mask-token input, blockwise masks of the presets, the
loss on masked positions against NumPy, two views of one crop, a frozen tokenizer (no gradient,
no optimizer state), the same step on 1 and 8 devices, bad input, and train -> evaluate ->
fine-tune on a BEiT run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import beit as beit_config
from configs import dvae as dvae_configs
from ssl_jax import finetune, methods, parallel, presets, train
from ssl_jax.config import ConfigError
from ssl_jax.data import masking
from ssl_jax.evaluate import __main__ as evaluate_main
from ssl_jax.methods import beit
from ssl_jax.models.vit import vit
from ssl_jax.models.vit_position import relative_position_index
from ssl_jax.restore import restore_state
from tests.method_steps import assert_grads_close, loss_step, set_key


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer_run):
    return tokenizer_run


def _config(tokenizer_dir, **overrides):
    config = beit_config.get_config("data=digits,runlocal")
    with config.unlocked():
        config.beit.tokenizer_workdir = tokenizer_dir
        config.eval.random_init_baseline = False
        for key, value in overrides.items():
            set_key(config, key, value)
    return config


def test_relative_position_index_against_brute_force():
    rows, cols = 3, 4
    index = relative_position_index((rows, cols), num_prefix=1)
    n = (2 * rows - 1) * (2 * cols - 1)
    coords = [(r, c) for r in range(rows) for c in range(cols)]
    offsets = {}
    for i, (ri, ci) in enumerate(coords):
        for j, (rj, cj) in enumerate(coords):
            entry = index[1 + i, 1 + j]
            assert 0 <= entry < n
            # One entry per relative offset, and every offset its own entry.
            assert offsets.setdefault((ri - rj, ci - cj), entry) == entry
    assert len(set(offsets.values())) == len(offsets) == n
    assert set(index[0, 1:]) == {n} and set(index[1:, 0]) == {n + 1} and index[0, 0] == n + 2


def test_zero_relative_bias_is_no_bias_and_the_table_learns():
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    plain = vit("ti", 4, depth=2, image_size=16, pos_embed="none")
    biased = vit("ti", 4, depth=2, image_size=16, pos_embed="none", rel_pos_bias=True)
    params = biased.init(jax.random.key(1), x, train=False)["params"]
    without = {k: v for k, v in params.items() if k != "rel_pos"}
    np.testing.assert_allclose(biased.apply({"params": params}, x, train=False),
                               plain.apply({"params": without}, x, train=False), atol=1e-5)
    loss = lambda p: jnp.sum(biased.apply({"params": p}, x, train=False) ** 2)
    grad = jax.grad(loss)(params)["rel_pos"]["table"]
    assert grad.shape == (7 * 7 + 3, 3) and float(jnp.max(jnp.abs(grad))) > 0
    with pytest.raises(ValueError, match="rel_pos_bias"):
        biased.apply({"params": params}, jnp.zeros((1, 24, 24, 3)), train=False)


def test_masked_patches_do_not_see_their_pixels():
    model = vit("ti", 4, depth=2, image_size=16, pos_embed="none", rel_pos_bias=True,
                use_mask_token=True)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    mask = jnp.zeros((2, 16), bool).at[:, :4].set(True)  # the top row of patches
    params = model.init(jax.random.key(1), x, train=False, bool_masked_pos=mask)
    noisy = x.at[:, :4].add(5.0)
    out = lambda images, m: model.apply(params, images, train=False, return_tokens=True,
                                        bool_masked_pos=m)
    np.testing.assert_allclose(out(noisy, mask), out(x, mask), atol=1e-5)
    assert float(jnp.max(jnp.abs(out(noisy, ~mask) - out(x, ~mask)))) > 1e-2


def test_loss_counts_masked_positions_only():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 10, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (3, 10))
    mask = rng.random((3, 10)) < 0.4
    loss, metrics = beit.masked_token_loss(jnp.asarray(logits), jnp.asarray(targets),
                                           jnp.asarray(mask))
    log_p = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
    nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), nll[mask].mean(), rtol=1e-5)
    hits = np.argmax(logits, -1) == targets
    np.testing.assert_allclose(float(metrics["masked_token_accuracy"]), hits[mask].mean(), 1e-6)
    changed = np.where(mask[..., None], logits, logits + rng.normal(size=logits.shape) * 9)
    again, _ = beit.masked_token_loss(jnp.asarray(changed), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(float(again), float(loss), rtol=1e-6)


@pytest.mark.parametrize("grid,ratio,min_block", [((8, 8), 0.4, 4), ((14, 14), 75 / 196, 16)])
def test_preset_block_masks_reach_the_ratio(grid, ratio, min_block):
    n = grid[0] * grid[1]
    num_masked = int(n * (ratio + 1e-6))
    masks = jax.vmap(lambda k: masking.block_mask(k, grid, num_masked, min_block))(
        jax.random.split(jax.random.key(0), 256))
    counts = np.asarray(masks).reshape(256, -1).sum(-1)
    assert counts.max() <= num_masked
    assert counts.mean() >= 0.9 * num_masked, (counts.mean(), num_masked)


def test_two_views_are_one_crop():
    # A horizontal ramp with a marker: a crop resized to 16 and to 8 px must agree once the
    # 16-px view is brought down to 8 px (same box, same flip).
    ramp = np.tile(np.linspace(0, 1, 32)[None, :, None], (32, 1, 3))
    ramp[:8, :8] = [1.0, 0.0, 0.0]
    images = jnp.asarray(np.stack([ramp] * 6).astype(np.float32))
    view = presets.view_config(size=16, crop_scale=(0.3, 1.0), color_jitter_p=0.0,
                               grayscale_p=0.0, blur_p=0.0, flip=True)
    big, small = beit.paired_views(jax.random.key(2), images, view, 8)
    assert big.shape == (6, 16, 16, 3) and small.shape == (6, 8, 8, 3)
    down = jax.image.resize(big, small.shape, "linear", antialias=True)
    assert float(jnp.max(jnp.abs(down - small))) < 0.15
    slopes = np.sign(np.asarray(big[:, 8, -1, 1] - big[:, 8, 0, 1]))
    assert set(slopes) == {-1.0, 1.0}  # both flip outcomes among 6 examples


def test_tokenizer_is_frozen_and_outside_the_optimizer(tokenizer_dir, tmp_path):
    config = _config(tokenizer_dir, total_steps=3)
    train.train(config, str(tmp_path))
    mesh = parallel.make_mesh()
    _, state, _ = restore_state(tmp_path, config, mesh)
    _, tok_state, _ = restore_state(tokenizer_dir, beit.load_tokenizer_run(tokenizer_dir, mesh)[1],
                                    mesh)
    for a, b in zip(jax.tree_util.tree_leaves(state["extra"]["tokenizer"]),
                    jax.tree_util.tree_leaves(tok_state["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert set(state["params"]) == {"encoder", "head"}
    opt_paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_leaves_with_path(state["opt_state"])]
    assert opt_paths and not any("tokenizer" in p or "dvae" in p for p in opt_paths)
    method = methods.create(config, mesh)
    batch = {"image": jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)),
                                  jnp.uint8)}
    grads = jax.grad(lambda extra: method.loss(state["params"], extra, batch,
                                               jax.random.key(0), 0)[0])(state["extra"])
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(grads))


def _one_step(tokenizer_dir, num_devices):
    mesh = parallel.make_mesh(devices=jax.devices()[:num_devices])
    method = methods.create(_config(tokenizer_dir), mesh)
    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    params, extra = method.init(jax.random.key(0), {"image": jnp.asarray(images)})
    return loss_step(method, params, extra, images, mesh)


def test_step_same_on_1_and_8_devices(tokenizer_dir):
    loss1, grads1, metrics1 = _one_step(tokenizer_dir, 1)
    loss8, grads8, metrics8 = _one_step(tokenizer_dir, 8)
    assert np.isfinite(loss1) and 0.2 < float(metrics1["mask_ratio"]) <= 0.4
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    np.testing.assert_allclose(metrics8["mask_ratio"], metrics1["mask_ratio"])
    assert_grads_close(grads8, grads1)


def test_presets_match_the_tokenizer_presets():
    for data in ("digits", "cifar10", "imagenet2012"):
        config = beit_config.get_config(f"data={data}")
        tok = dvae_configs.get_config(f"data={data}")
        assert config.beit.vocab_size == tok.dvae.vocab_size, data
        patch = int(config.model.name.split("vit_ti" if "ti" in config.model.name else "vit_b")[1])
        grid = config.aug.view1.size // patch
        assert grid == tok.aug.view1.size // 2 ** tok.dvae.num_downsample, data


@pytest.mark.parametrize("key,value,match", [
    ("beit.tokenizer_workdir", "", "beit.tokenizer_workdir"),
    ("beit.vocab_size", 17, "beit.vocab_size"),
    ("aug.view1.size", 8, "beit.tokenizer_workdir"),  # a 4x4 ViT grid vs 8x8 tokens
    ("beit.min_block_patches", 30, "beit.min_block_patches"),
    ("beit.mask_ratio", 1.0, "beit.mask_ratio"),
    ("model.use_mask_token", False, "model.use_mask_token"),
])
def test_bad_config_named_before_compile(tokenizer_dir, key, value, match):
    config = _config(tokenizer_dir, **{key: value})
    with pytest.raises(ConfigError, match=match):
        methods.create(config, parallel.make_mesh())


def test_tokenizer_workdir_of_another_method_is_refused(trained_run, tokenizer_dir):
    _, simclr_dir = trained_run
    with pytest.raises(ConfigError, match="not a dVAE"):
        methods.create(_config(str(simclr_dir)), parallel.make_mesh())
    with pytest.raises(ConfigError, match="config.json"):
        methods.create(_config(tokenizer_dir + "/missing"), parallel.make_mesh())


def _is_a_fraction_of(num_test: int, top1: float) -> bool:
    """``top1`` is a share of ``num_test`` test images: ``k / num_test`` for an integer k."""
    k = round(top1 * num_test)
    return 0 <= k <= num_test and abs(top1 - k / num_test) < 1e-6


def test_train_evaluate_and_finetune_a_beit_run(tokenizer_dir, tmp_path):
    config = _config(tokenizer_dir, total_steps=2)
    train.train(config, str(tmp_path))
    results = evaluate_main.evaluate(str(tmp_path))
    assert results["ssl"]["linear_top1"] > 0.2  # chance: 0.1
    picture = Image.open(results["reconstruction_picture"])
    assert picture.size[0] == 4 * 96 + 3 * 2  # original, masked, tokenizer, prediction
    out = finetune.finetune(str(tmp_path), "configs/finetune.py:data=digits,runlocal")
    assert out["init"] == "pretrained" and _is_a_fraction_of(out["num_test"], out["test_top1"])

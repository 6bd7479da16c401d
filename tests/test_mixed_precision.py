"""bfloat16 compute with float32 parameters (``config.model.dtype='bfloat16'``): DINO's last
layer returns float32 logits, the methods' steps stay close to their float32 steps, and
fine-tuning may change the compute dtype of a pre-trained run. The layers themselves in bfloat16
(float32 accumulation, float32 bias gradients) are tested in test_layers.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import dino as dino_config
from configs import mae as mae_config
from ssl_jax import methods, parallel
from ssl_jax.config import ConfigError
from ssl_jax.finetuning import job as finetune
from tests.method_steps import loss_step


def _bf16_exact(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values that bfloat16 holds exactly, so that only the arithmetic rounds."""
    return np.asarray(jnp.asarray(rng.normal(size=shape), jnp.bfloat16).astype(jnp.float32))


def test_dino_last_layer_in_bfloat16_returns_unrounded_float32_logits():
    """DINO's weight-normed last layer: the bf16 product is accumulated in float32 and returned
    unrounded (the teacher's temperature 0.04 would magnify a bf16 rounding 25x); gradients come
    back float32 to the float32 parameters and match float64 maths of the same bf16 operands."""
    from ssl_jax.methods.dino import WeightNormDense

    rng = np.random.default_rng(1)
    x = _bf16_exact(rng, (64, 256))
    x = x / np.linalg.norm(x, axis=1, keepdims=True)  # the head feeds it unit vectors
    cot = rng.normal(size=(64, 96)).astype(np.float32)
    module = WeightNormDense(96, fix_gain=False, dtype=jnp.bfloat16)
    params = module.init(jax.random.key(0), x)
    out = module.apply(params, x)
    assert out.dtype == jnp.float32

    v = np.asarray(params["params"]["kernel_v"], np.float64)
    w = v / np.linalg.norm(v, axis=0, keepdims=True)  # gain 1 at init
    w16 = np.asarray(jnp.asarray(w, jnp.bfloat16).astype(jnp.float32), np.float64)
    x16 = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
    expected = x16 @ w16
    # Unrounded: float32 accumulation error only (a bf16 result would be off by ~2^-9 of 1).
    np.testing.assert_allclose(out, expected, atol=1e-5)
    rounded = np.asarray(jnp.asarray(expected, jnp.bfloat16).astype(jnp.float32))
    assert np.abs(rounded - expected).max() > 10 * np.abs(np.asarray(out) - expected).max()

    loss = lambda params: jnp.sum(module.apply(params, x) * cot)
    grads = jax.jit(jax.grad(loss))(params)["params"]
    loss32 = lambda params: jnp.sum(module.clone(dtype=jnp.float32).apply(params, x) * cot)
    grads32 = jax.jit(jax.grad(loss32))(params)["params"]
    for name in ("kernel_v", "gain"):
        assert grads[name].dtype == jnp.float32
        scale = float(jnp.abs(grads32[name]).max())
        np.testing.assert_allclose(grads[name], grads32[name], atol=2e-2 * scale)


@pytest.mark.parametrize("config_module, arg", [
    (mae_config, "data=digits,runlocal"),
    (dino_config, "data=digits,runlocal,model=vit_ti4"),
], ids=["mae", "dino"])
def test_method_step_in_bfloat16_is_close_to_float32(config_module, arg):
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    mesh = parallel.make_mesh()
    results = {}
    for dtype in ("float32", "bfloat16"):
        config = config_module.get_config(arg)
        config.model.dtype = dtype
        method = methods.create(config, mesh)
        params, extra = method.init(jax.random.key(0), {"image": jnp.asarray(images)})
        assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
        results[dtype] = loss_step(method, params, extra, images, mesh)
    (loss32, grads32, _), (loss16, grads16, _) = results["float32"], results["bfloat16"]
    assert np.isfinite(loss16)
    np.testing.assert_allclose(loss16, loss32, rtol=5e-2)
    flat32, flat16 = (np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(t)])
                      for t in (grads32, grads16))
    assert all(g.dtype == np.float32 for g in jax.tree_util.tree_leaves(grads16))
    assert np.isfinite(flat16).all()
    cosine = flat16 @ flat32 / (np.linalg.norm(flat16) * np.linalg.norm(flat32))
    assert cosine > 0.95, cosine


def test_finetune_may_change_the_compute_dtype_of_a_run():
    run = ml_collections.ConfigDict({"model": {"name": "vit_ti4", "depth": 2}})  # saved before
    config = ml_collections.ConfigDict({"model": {"name": "vit_ti4", "depth": 2,
                                                  "dtype": "bfloat16"}})
    finetune.check_model_unchanged(config, run, "ckpt", "config.json")  # no error
    assert methods.model_dtype(config) == jnp.bfloat16
    assert methods.model_dtype(run) == jnp.float32  # runs saved before the key: float32
    config.model.depth = 3
    with pytest.raises(ConfigError, match=r"config\.model\.depth=3 does not match"):
        finetune.check_model_unchanged(config, run, "ckpt", "config.json")
    config.model.dtype = "int8"
    with pytest.raises(ConfigError, match=r"config\.model\.dtype='int8' is not a compute dtype"):
        methods.model_dtype(config)


def test_a_run_resumes_in_another_compute_dtype_and_older_runs_resume(tmp_path):
    from ssl_jax import checkpoint as ckpt_lib

    old = mae_config.get_config("data=digits,runlocal")
    with old.unlocked():
        del old.model["dtype"]  # a run saved before the key existed
    ckpt_lib.check_workdir(tmp_path, old)
    for dtype in ("float32", "bfloat16"):
        config = mae_config.get_config("data=digits,runlocal")
        config.model.dtype = dtype
        ckpt_lib.check_workdir(tmp_path, config)  # resumes: same method, same model
    config.model.depth = 3
    with pytest.raises(ckpt_lib.WorkdirError, match="holds a run with model="):
        ckpt_lib.check_workdir(tmp_path, config)

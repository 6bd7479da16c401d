"""ssl_jax/models/layers.py: Dense and Conv with hand-written VJPs (against flax and autodiff),
``matmul_float32``, exact GELU, attention with its VJP, and the layers in bfloat16 (float32
accumulation, float32 bias gradients)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.models import layers
from ssl_jax.models.vit import Attention


def _bf16_exact(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values that bfloat16 holds exactly, so that only the arithmetic rounds."""
    return np.asarray(jnp.asarray(rng.normal(size=shape), jnp.bfloat16).astype(jnp.float32))


# --- float32: the custom VJPs against flax and autodiff ------------------------------------------


def test_fast_dense_and_gelu_match_flax():
    x = jax.random.normal(jax.random.key(0), (4, 5, 12))
    def grads(module, params, x):
        loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    for features in (7, 30):  # out < in and out > in: both weight-gradient branches
        params = nn.Dense(features).init(jax.random.key(1), x)
        ref = grads(nn.Dense(features), params, x)
        fast = grads(layers.Dense(features), params, x)
        for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(ref),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    h = jnp.linspace(-8.0, 8.0, 101)
    np.testing.assert_allclose(layers.gelu(h), jax.nn.gelu(h, approximate=False), atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda h: layers.gelu(h).sum())(h),
                               jax.grad(lambda h: jax.nn.gelu(h, approximate=False).sum())(h),
                               atol=1e-6)


@pytest.mark.parametrize("kernel,strides,padding,features", [
    ((3, 3), (1, 1), ((1, 1), (1, 1)), 6),     # ResNet 3x3, more outputs than inputs
    ((3, 3), (2, 2), ((1, 1), (1, 1)), 3),     # downsampling 3x3, fewer outputs
    ((1, 1), (2, 2), "SAME", 8),               # projection shortcut, string padding
    ((4, 4), (4, 4), "VALID", 5),              # ViT patch embedding
    ((3, 2), (1, 2), ((2, 0), (0, 1)), 4),     # odd kernel, strides and padding
])
def test_fast_conv_matches_flax(kernel, strides, padding, features):
    x = jax.random.normal(jax.random.key(0), (3, 9, 8, 4))
    kwargs = {"kernel_size": kernel, "strides": strides, "padding": padding, "use_bias": False}
    params = nn.Conv(features, **kwargs).init(jax.random.key(1), x)

    def grads(module):
        loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
        return module.apply(params, x), jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    (out, ref), (fast_out, fast) = grads(nn.Conv(features, **kwargs)), grads(
        layers.Conv(features, **kwargs))
    np.testing.assert_allclose(fast_out, out, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_conv_weight_gradient_summed_over_batch_chunks_is_exact(monkeypatch):
    """With patches over the byte budget, the weight gradient loops over chunks of the batch
    (images k, k + m, ...): the same gradients as flax's, on one device and with the batch
    sharded over 8 (each chunk takes every device's share)."""
    from jax.sharding import NamedSharding, PartitionSpec

    assert layers._patch_chunks(32, 1) == 1  # within the budget: one chunk
    monkeypatch.setattr(layers, "PATCH_CHUNK_BYTES", 3 * 9 * 8 * 36 * 4)  # 3 images' patches
    n, shape = 32, (9, 8, 4)
    assert layers._patch_chunks(n, 9 * 8 * 36 * 4) == 4  # ceil(32 / 3) = 11 -> divisor of 32/8
    x = jax.random.normal(jax.random.key(0), (n, *shape))
    kwargs = {"kernel_size": (3, 3), "strides": (1, 1), "padding": ((1, 1), (1, 1)),
              "use_bias": False}
    params = nn.Conv(6, **kwargs).init(jax.random.key(1), x)

    def grads(module, x):
        loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    ref = grads(nn.Conv(6, **kwargs), x)
    jaxpr = str(jax.make_jaxpr(jax.grad(
        lambda p: jnp.sum(layers.Conv(6, **kwargs).apply(p, x))))(params))
    assert "scan[" in jaxpr or "while[" in jaxpr  # the chunk loop is there
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    for inputs in (x, sharded):
        fast = grads(layers.Conv(6, **kwargs), inputs)
        for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(ref),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_matches_dot_product_attention(with_bias):
    dim, heads, tokens = 24, 3, 9
    x = jax.random.normal(jax.random.key(0), (2, tokens, dim))
    bias = jax.random.normal(jax.random.key(1), (1, heads, tokens, tokens)) if with_bias else None
    module = Attention(dim, heads)
    params = module.init(jax.random.key(2), x, bias)
    p = params["params"]
    qkv = (x @ p["qkv"]["kernel"] + p["qkv"]["bias"]).reshape(2, tokens, 3, heads, dim // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    ref = jax.nn.dot_product_attention(q, k, v, bias=bias).reshape(2, tokens, dim)
    ref = ref @ p["proj"]["kernel"] + p["proj"]["bias"]
    np.testing.assert_allclose(module.apply(params, x, bias), ref, rtol=1e-5, atol=1e-5)
    weights = module.apply(params, x, bias, return_weights=True)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dim // heads)
    expected = jax.nn.softmax(logits + (0.0 if bias is None else bias), axis=-1)
    np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias_shape", [None, (1, 3, 7, 7), (3, 7, 7), (2, 1, 7, 7)])
def test_attention_vjp_matches_autodiff(bias_shape):
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(key, (2, 3, 7, 4)) for key in keys[:3])
    bias = None if bias_shape is None else jax.random.normal(keys[3], bias_shape)
    weight = jax.random.normal(keys[4], (2, 7, 3, 4))  # a loss that weighs every output

    def reference(q, k, v, bias):
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) + (0.0 if bias is None else bias)
        return jnp.einsum("bhqk,bhkd->bqhd", jax.nn.softmax(logits, axis=-1), v)

    args = (q, k, v, bias)
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a)) * weight), argnums)(*args)
             for f in (layers.attention, reference)]
    np.testing.assert_allclose(layers.attention(*args), reference(*args), rtol=1e-5, atol=1e-6)
    for fast, ref in zip(*grads, strict=True):
        assert fast.shape == ref.shape
        np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-5)


# --- bfloat16 compute, float32 parameters ---------------------------------------------------------


def test_dense_in_bfloat16_accumulates_and_sums_the_bias_gradient_in_float32():
    rng = np.random.default_rng(0)
    rows, features = 4096, 8
    x = _bf16_exact(rng, (rows, 16))
    weight = _bf16_exact(rng, (rows, features))  # the cotangent of the output
    module = layers.Dense(features, dtype=jnp.bfloat16,
                          bias_init=jax.nn.initializers.normal(1.0))
    params = module.init(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))

    out = module.apply(params, x)
    assert out.dtype == jnp.bfloat16
    p = jax.tree_util.tree_map(np.asarray, params["params"])
    kernel = np.asarray(jnp.asarray(p["kernel"], jnp.bfloat16).astype(jnp.float32), np.float64)
    expected = x.astype(np.float64) @ kernel + p["bias"]
    # One rounding of the float32 result to bfloat16 (8 significant bits).
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=2**-8, atol=1e-6)

    loss = lambda params: jnp.sum(module.apply(params, x).astype(jnp.float32) * weight)
    grads = jax.jit(jax.grad(loss))(params)["params"]
    assert grads["kernel"].dtype == grads["bias"].dtype == jnp.float32
    # The bias gradient is the float32 sum of 4096 bfloat16 cotangents: a bfloat16 running sum
    # would be off by ~1e-2 relative, a float32 one by ~1e-6.
    bias_expected = weight.astype(np.float64).sum(axis=0)
    np.testing.assert_allclose(grads["bias"], bias_expected, rtol=1e-5,
                               atol=1e-5 * np.abs(bias_expected).max())
    kernel_expected = x.astype(np.float64).T @ weight
    np.testing.assert_allclose(grads["kernel"], kernel_expected, rtol=2**-7,
                               atol=2**-7 * np.abs(kernel_expected).max())


def test_attention_in_bfloat16_is_close_to_float32():
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(key, (2, 3, 9, 8)).astype(jnp.bfloat16) for key in keys[:3])
    bias = jax.random.normal(keys[3], (1, 3, 9, 9))
    weight = jax.random.normal(keys[4], (2, 9, 3, 8))

    def loss(q, k, v, bias):
        return jnp.sum(layers.attention(q, k, v, bias).astype(jnp.float32) * weight)

    as32 = lambda *a: [t.astype(jnp.float32) for t in a]
    out16, out32 = layers.attention(q, k, v, bias), layers.attention(*as32(q, k, v), bias)
    assert out16.dtype == jnp.bfloat16 and out32.dtype == jnp.float32
    np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=3e-2)
    grads16 = jax.grad(loss, (0, 1, 2, 3))(q, k, v, bias)
    grads32 = jax.grad(loss, (0, 1, 2, 3))(*as32(q, k, v), bias)
    assert grads16[3].dtype == jnp.float32  # the bias is float32 and so is its gradient
    # The weights the ViT returns (and other backends' attention) take float32 logits of the
    # bfloat16 q, k: as exact as float32 on the same inputs, not rounded to bfloat16 first.
    weights = layers.attention_weights(q, k, bias)
    expected = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", *as32(q, k)) + bias, axis=-1)
    assert weights.dtype == jnp.float32
    np.testing.assert_allclose(weights, expected, atol=1e-6)
    for g16, g32 in zip(grads16, grads32, strict=True):
        scale = float(jnp.abs(g32).max())
        np.testing.assert_allclose(g16.astype(jnp.float32), g32, atol=3e-2 * scale)


def test_convolution_in_bfloat16_is_close_to_float32():
    x = jax.random.normal(jax.random.key(0), (4, 12, 12, 8))
    weight = jax.random.normal(jax.random.key(1), (4, 6, 6, 16))
    kwargs = {"kernel_size": (3, 3), "strides": (2, 2), "padding": ((1, 1), (1, 1))}
    params = layers.Conv(16, **kwargs).init(jax.random.key(2), x)
    results = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        module = layers.Conv(16, dtype=dtype, **kwargs)
        loss = lambda p, m=module: jnp.sum(m.apply(p, x).astype(jnp.float32) * weight)
        results[dtype] = module.apply(params, x), jax.grad(loss)(params)["params"]
    (out32, grads32), (out16, grads16) = results[jnp.float32], results[jnp.bfloat16]
    assert out16.dtype == jnp.bfloat16 and grads16["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(out16.astype(jnp.float32), out32,
                               atol=2e-2 * float(jnp.abs(out32).max()))
    for name in ("kernel", "bias"):
        scale = float(jnp.abs(grads32[name]).max())
        np.testing.assert_allclose(grads16[name], grads32[name], atol=2e-2 * scale)


def test_matmul_float32_returns_unrounded_float32_and_gradients_in_operand_dtypes():
    rng = np.random.default_rng(3)
    x, w = _bf16_exact(rng, (32, 64)), _bf16_exact(rng, (64, 24))
    cot = rng.normal(size=(32, 24)).astype(np.float32)
    x16, w16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    out = layers.matmul_float32(x16, w16)
    expected = x.astype(np.float64) @ w.astype(np.float64)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, atol=1e-5 * np.abs(expected).max())
    rounded = np.asarray(jnp.asarray(expected, jnp.bfloat16).astype(jnp.float32))
    assert np.abs(rounded - expected).max() > 10 * np.abs(np.asarray(out) - expected).max()

    dx, dw = jax.grad(lambda a, b: jnp.sum(layers.matmul_float32(a, b) * cot), (0, 1))(x16, w16)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    for grad, exact in ((dx, cot.astype(np.float64) @ w.T), (dw, x.T.astype(np.float64) @ cot)):
        np.testing.assert_allclose(np.asarray(grad, np.float32), exact, rtol=2**-7,
                                   atol=2**-7 * np.abs(exact).max())


def test_conv_with_negative_padding_or_dilation_goes_to_lax():
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    for kwargs in ({"padding": ((-1, 1), (0, 0))}, {"padding": ((1, 1), (1, 1)),
                                                    "rhs_dilation": (2, 2)}):
        args = (x, w, (1, 1), kwargs.pop("padding"))
        dn = {"dimension_numbers": ("NHWC", "HWIO", "NHWC")}
        np.testing.assert_allclose(layers.conv_general_dilated(*args, **kwargs, **dn),
                                   jax.lax.conv_general_dilated(*args, **kwargs, **dn),
                                   rtol=1e-6, atol=1e-6)

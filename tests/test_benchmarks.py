"""The throughput harness and the FLOP counting behind the trainer's 'mfu' metric."""

import json
import math

import jax
import jax.numpy as jnp
import pytest

from benchmarks import throughput
from ssl_jax import flops


def test_flops_of_a_matmul_are_2mnk():
    m, n, k = 64, 48, 80
    step = flops.CountedStep(jax.jit(lambda a, b: a @ b))
    out = step(jnp.ones((m, k)), jnp.ones((k, n)))
    assert out.shape == (m, n)
    assert step.flops == 2 * m * n * k
    step(jnp.ones((m, k)), jnp.ones((k, n)))  # the compiled executable is reused
    assert step.compiled is not None


def test_measured_peak_and_mfu():
    peak = flops.matmul_peak_flops(256, repeats=2)
    assert math.isfinite(peak) and peak > 0
    assert flops.mfu(2e9, 0.5, 4e9) == pytest.approx(0.25)
    assert flops.mfu_metric(math.nan, 1.0, peak) == {}


def test_harness_reports_positive_finite_figures():
    config = throughput.load_config("configs/mae.py:data=digits,runlocal",
                                    {"batch_size": 8, "model.depth": 1})
    result = throughput.measure(config, steps=2, warmup=0, rounds=1, peak_size=256)
    for key in ("compile_s", "step_ms", "images_per_sec", "gflops_per_image",
                "achieved_gflops_per_sec", "peak_gflops_per_sec", "mfu"):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    assert result["steps_timed"] == 2
    assert json.loads(throughput.report(config, result).splitlines()[-1])["method"] == "mae"


def test_trainer_logs_mfu(trained_run):
    _, workdir = trained_run
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(isinstance(r["mfu"], float) and r["mfu"] > 0 for r in rows)


def test_fast_dense_and_gelu_match_flax():
    import flax.linen as nn
    import numpy as np

    from ssl_jax.models import layers

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
    import flax.linen as nn
    import numpy as np

    from ssl_jax.models import layers

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


@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_matches_dot_product_attention(with_bias):
    import numpy as np

    from ssl_jax.models.vit import Attention

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
    import numpy as np

    from ssl_jax.models import layers

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


def test_allocator_is_read_from_the_mapped_libraries(tmp_path):
    from ssl_jax import allocator

    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
                    "7f02-7f03 r-xp 0 08:01 2 [heap]\n")
    assert allocator.active(str(maps)) == "system"
    assert allocator.hint("cpu", "system") is not None and "jemalloc" in allocator.hint("cpu",
                                                                                      "system")
    with maps.open("a") as f:
        f.write("7f04-7f05 r-xp 0 08:01 3 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert allocator.active(str(maps)) == "jemalloc"
    assert allocator.hint("cpu", "jemalloc") is None and allocator.hint("gpu", "system") is None
    assert allocator.active(str(tmp_path / "missing")) == "system"

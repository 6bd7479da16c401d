"""Dense and convolution layers and GELU, arranged for XLA:CPU's matmul library.

Same maths and parameters as ``flax.linen.Dense`` and ``jax.nn.gelu(approximate=False)``; what
differs is how XLA:CPU runs them (measured in docs/performance.md):

- the weight gradient ``dW = x^T g`` of a dense layer contracts over the batch*tokens dimension;
  left to itself, XLA:CPU runs it with its generic dot (not YNNPACK's fast matmul) behind
  transposed copies. :func:`dense_dot_general` gives ``nn.Dense`` a custom VJP that transposes
  the narrower operand explicitly (kept apart by an optimization barrier), so that both backward
  matmuls are row-major and run in YNNPACK. Other backends keep ``lax.dot_general``.
- the weight gradient of a convolution: XLA expresses it as a convolution with the batch as
  the contracted feature dimension and the image as the window, which XLA:CPU runs at a few
  GFLOP/s (1.2 s of a 1.9 s ResNet-18 step at batch 32). :func:`conv_general_dilated` gives
  ``nn.Conv`` a custom VJP whose weight gradient is one matmul of the im2col patches (the
  ``kh * kw`` shifted, strided views of the padded input side by side) with the output
  gradient, on the same fast path as the dense layers'. The input gradient and the forward
  pass stay XLA's own convolutions.
- :func:`gelu` uses ``erf`` (torch's form) rather than ``erfc``: XLA:CPU's YNNPACK path has an
  ``erf`` kernel, and the ``erfc`` expansion is several times slower.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``[..., in] @ [in, out] -> [..., out]``."""
    return x @ w


def _matmul_fwd(x: jax.Array, w: jax.Array):
    return x @ w, (x, w)


def _weight_grad(x2: jax.Array, g2: jax.Array) -> jax.Array:
    """``x2^T g2`` for ``x2 [n, in]``, ``g2 [n, out]`` (a contraction over the long ``n``), with
    the narrower operand transposed explicitly (kept apart by an optimization barrier so that
    XLA does not fold it back into the dot): both products are then row-major."""
    barrier = jax.lax.optimization_barrier
    if x2.shape[1] <= g2.shape[1]:  # [in, n] @ [n, out]
        return barrier(x2.T) @ g2
    return barrier(barrier(g2.T) @ x2).T  # ([out, n] @ [n, in])^T, the small result transposed


def _matmul_bwd(residuals, g: jax.Array):
    x, w = residuals
    dw = _weight_grad(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]))
    return g @ w.T, dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``nn.Dense``'s contraction (``dot_general=``): :func:`_matmul` on CPU for the plain
    ``[..., in] x [in, out]`` case, ``lax.dot_general`` otherwise."""
    (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
    plain = (tuple(lhs_c) == (lhs.ndim - 1,) and tuple(rhs_c) == (0,) and not lhs_b
             and not rhs_b and rhs.ndim == 2 and precision is None
             and preferred_element_type is None and lhs.dtype == rhs.dtype)
    if plain and jax.default_backend() == "cpu":
        return _matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


Dense = functools.partial(nn.Dense, dot_general=dense_dot_general)
"""``nn.Dense`` with :func:`dense_dot_general` (same parameters, same outputs)."""


_NHWC = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x: jax.Array, w: jax.Array, strides, padding) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, w: jax.Array, strides: tuple, padding: tuple) -> jax.Array:
    """NHWC x HWIO convolution with explicit ``((lo, hi), (lo, hi))`` padding."""
    return _lax_conv(x, w, strides, padding)


def _conv_fwd(x, w, strides, padding):
    return _lax_conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, g):
    x, w = residuals
    _, input_vjp = jax.vjp(lambda x: _lax_conv(x, w, strides, padding), x)
    (dx,) = input_vjp(g)
    kh, kw, cin, cout = w.shape
    _, out_h, out_w, _ = g.shape
    (sh, sw) = strides
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    patches = jnp.concatenate([  # [n, out_h, out_w, kh * kw * cin], (i, j, c) order
        xp[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
        for i in range(kh) for j in range(kw)], axis=-1)
    dw = _weight_grad(patches.reshape(-1, kh * kw * cin), g.reshape(-1, cout))
    return dx, dw.reshape(w.shape).astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None):
    """``nn.Conv``'s convolution (``conv_general_dilated=``): :func:`_conv` on CPU for plain
    NHWC/HWIO convolutions (no dilation, no groups, no negative padding), else
    ``lax.conv_general_dilated``."""
    nhwc = (lhs.ndim == 4 and rhs.ndim == 4
            and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if nhwc and isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    plain = (nhwc and jax.default_backend() == "cpu" and feature_group_count == 1
             and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
             and precision is None and lhs.dtype == rhs.dtype
             and all(lo >= 0 and hi >= 0 for lo, hi in padding))
    if plain:
        return _conv(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        precision=precision)


Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
"""``nn.Conv`` with :func:`conv_general_dilated` (same parameters, same outputs)."""


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU ``x Phi(x) = x (1 + erf(x / sqrt 2)) / 2``."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(np.sqrt(0.5), x.dtype)))


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``x`` summed over the dimensions that ``shape`` broadcasts (the gradient of a bias)."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape)
                                      if n == 1 and x.shape[lead + i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


def _attention_fwd(q, k, v, bias):
    logits = q @ jnp.swapaxes(k, -1, -2)
    if bias is not None:
        logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.swapaxes(weights @ v, 1, 2), (q, k, v, weights, bias)


def _attention_bwd(residuals, d_out):
    q, k, v, weights, bias = residuals
    barrier, swap = jax.lax.optimization_barrier, lambda t: jnp.swapaxes(t, -1, -2)
    d_out = jnp.swapaxes(d_out, 1, 2)  # [b, h, q, d]
    d_weights = d_out @ barrier(swap(v))
    d_v = barrier(swap(weights)) @ d_out
    d_logits = weights * (d_weights - jnp.sum(d_weights * weights, axis=-1, keepdims=True))
    d_q = d_logits @ k
    d_k = barrier(swap(d_logits)) @ q
    d_bias = None if bias is None else _sum_to(d_logits, bias.shape).astype(bias.dtype)
    return d_q, d_k, d_v, d_bias


@jax.custom_vjp
def _attention(q, k, v, bias):
    return _attention_fwd(q, k, v, bias)[0]


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None
              ) -> jax.Array:
    """``softmax(q k^T + bias) v`` per head: ``q, k, v [batch, heads, tokens, head_dim]``
    (``q`` already scaled), ``bias`` broadcastable to ``[batch, heads, tokens, tokens]`` ->
    ``[batch, tokens, heads, head_dim]``. On CPU in float32, with a hand-written VJP whose four
    batched products all take their operands row-major (XLA's own VJP of this graph runs two
    of them in its generic dot)."""
    if jax.default_backend() == "cpu" and q.dtype == jnp.float32:
        return _attention(q, k, v, None if bias is None else bias.astype(jnp.float32))
    return jnp.einsum("bhqk,bhkd->bqhd", attention_weights(q, k, bias).astype(v.dtype), v)


def attention_weights(q: jax.Array, k: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``softmax(q k^T + bias)`` in float32, ``[batch, heads, tokens, tokens]`` (rows sum to 1);
    shapes as :func:`attention`."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1)

"""Dense and convolution layers and GELU, arranged for XLA:CPU's matmul library.

Same maths and parameters as ``flax.linen.Dense`` and ``jax.nn.gelu(approximate=False)``; what
differs is how XLA:CPU runs them (measured in docs/performance.md):

- the weight gradient ``dW = x^T g`` of a dense layer contracts over the batch*tokens dimension;
  left to itself, XLA:CPU runs it with its generic dot (not YNNPACK's fast matmul) behind
  transposed copies. :class:`Dense` has a custom VJP that transposes the narrower operand
  explicitly (kept apart by an optimization barrier), so that both backward matmuls are
  row-major and run in YNNPACK. Other backends keep ``nn.Dense``'s maths.
- bfloat16 compute (``dtype=jnp.bfloat16``): a bfloat16 x bfloat16 product asked for a float32
  result runs on the CPU's AMX/bf16 kernel (3-4x XLA's float32 matmul here), one asked for a
  bfloat16 result on a slow generic path; so every product here accumulates in float32 and is
  rounded after, and the bias gradient is summed in float32 (XLA rewrites a bfloat16 sum into
  a rounding-at-every-add reduce-window that is both slow and inexact).
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
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` in the operands' dtype, accumulated in float32: for bfloat16 operands the
    product asks for a float32 result and rounds it, which sends it to XLA:CPU's AMX/bf16
    matmul kernel (1-1.5 TFLOP/s here, against ~0.3 for a bfloat16 result)."""
    if a.dtype == jnp.bfloat16:
        return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(a.dtype)
    return a @ b


def _mm32(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` in float32 (accumulated and returned): the attention logits and their
    gradient, which the softmax takes in float32."""
    if a.dtype == jnp.bfloat16:
        return jnp.matmul(a, b, preferred_element_type=jnp.float32)
    return a @ b


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _affine(x: jax.Array, w: jax.Array, b: jax.Array | None, float32_out: bool) -> jax.Array:
    """``x @ w + b`` for ``x [..., in]``, ``w [in, out]`` and a float32 ``b [out]`` (or None),
    in ``x``'s dtype (float32 with ``float32_out``); a bfloat16 product is accumulated, and the
    bias added, in float32."""
    return _affine_fwd(x, w, b, float32_out)[0]


def _affine_fwd(x: jax.Array, w: jax.Array, b: jax.Array | None, float32_out: bool):
    y = _mm32(x, w)
    if b is not None:
        y = y + b
    return (y if float32_out else y.astype(x.dtype)), (x, w, b)


def _weight_grad(x2: jax.Array, g2: jax.Array) -> jax.Array:
    """``x2^T g2`` for ``x2 [n, in]``, ``g2 [n, out]`` (a contraction over the long ``n``), with
    the narrower operand transposed explicitly (kept apart by an optimization barrier so that
    XLA does not fold it back into the dot): both products are then row-major."""
    barrier = jax.lax.optimization_barrier
    if x2.shape[1] <= g2.shape[1]:  # [in, n] @ [n, out]
        return _mm(barrier(x2.T), g2)
    return barrier(_mm(barrier(g2.T), x2)).T  # ([out, n] @ [n, in])^T, the small result transposed


def _affine_bwd(float32_out: bool, residuals, g: jax.Array):
    del float32_out
    x, w, b = residuals
    # The bias gradient is summed in float32 (a bfloat16 sum rounds at every addition).
    db = None if b is None else jnp.sum(g.reshape(-1, g.shape[-1]).astype(jnp.float32),
                                        axis=0).astype(b.dtype)
    g = g.astype(x.dtype)  # a float32 result's cotangent: the products run in x's dtype
    dw = _weight_grad(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]))
    return _mm(g, w.T), dw.astype(w.dtype), db


_affine.defvjp(_affine_fwd, _affine_bwd)


class Dense(nn.Dense):
    """``nn.Dense`` (same fields, same parameters, same outputs) whose product, bias and both
    backward products run as :func:`_affine` on CPU (a bfloat16 product accumulated in float32
    and the float32 bias added before rounding); other backends run ``nn.Dense``'s own maths.
    Only the plain fields are honoured (no ``dot_general``, ``precision``)."""

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        dtype = self.dtype or jnp.result_type(inputs, kernel)
        x, w = inputs.astype(dtype), kernel.astype(dtype)
        if jax.default_backend() == "cpu":
            return _affine(x, w, bias, False)
        y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
        return y if bias is None else y + bias.astype(dtype)


def matmul_float32(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., in] @ w [in, out]`` in the operands' dtype with a float32 result: a bfloat16
    product is accumulated in float32 and not rounded (DINO's last layer, whose cosine logits
    a temperature of 0.04 magnifies 25x: rounded to bfloat16 they would be ~0.1 off). The
    gradients come back in the operands' dtypes; on CPU through the products of :class:`Dense`."""
    if jax.default_backend() == "cpu":
        return _affine(x, w, None, True)
    return jnp.matmul(x, w, preferred_element_type=jnp.float32)


_NHWC = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x: jax.Array, w: jax.Array, strides, padding) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, w: jax.Array, strides: tuple, padding: tuple) -> jax.Array:
    """NHWC x HWIO convolution with explicit ``((lo, hi), (lo, hi))`` padding."""
    return _lax_conv(x, w, strides, padding)


def _conv_fwd(x, w, strides, padding):
    return _lax_conv(x, w, strides, padding), (x, w)


# The im2col patches of a weight gradient are kh * kw times the input: at CIFAR scale (64
# channels, 32 x 32, 512 views) one layer's are 1.2 GB, and XLA keeps several alive at once. The
# weight gradient is therefore summed over chunks of the batch whose patches stay under this
# many bytes, one chunk at a time (a loop), each still one long matmul.
PATCH_CHUNK_BYTES = 32 * 2**20


def _patch_chunks(n: int, bytes_per_image: int) -> int:
    """How many chunks the batch of ``n`` images is cut into: the fewest whose patches fit in
    :data:`PATCH_CHUNK_BYTES`, among the divisors of the per-device batch (so that every chunk
    takes the same share of each device's images and the batch sharding is kept)."""
    devices = jax.device_count()
    per_device = n // devices if n % devices == 0 else n
    need = -(-n * bytes_per_image // PATCH_CHUNK_BYTES)
    return next((m for m in range(1, per_device + 1) if per_device % m == 0 and m >= need),
                per_device)


def _patches(xp: jax.Array, kernel_hw: tuple[int, int], strides, out_hw) -> jax.Array:
    """``[n, out_h, out_w, kh * kw * cin]`` im2col patches of the padded input ``xp``, in
    (i, j, c) order: the ``kh * kw`` shifted, strided views side by side."""
    (kh, kw), (sh, sw), (out_h, out_w) = kernel_hw, strides, out_hw
    return jnp.concatenate([
        xp[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
        for i in range(kh) for j in range(kw)], axis=-1)


def _conv_weight_grad(x, g, w_shape, strides, padding) -> jax.Array:
    """``dL/dW [kh, kw, cin, cout]`` of a convolution: ``patches(x)^T g``, over chunks of the
    batch (:func:`_patch_chunks`); chunk ``k`` holds images ``k, k + m, k + 2m, ...`` (``m``
    chunks), so each device's rows stay on it. float32 accumulation across chunks."""
    kh, kw, cin, cout = w_shape
    n, out_h, out_w, _ = g.shape
    rows = kh * kw * cin

    def chunk_grad(xc, gc):  # padded here, so that only a chunk's padded copy is alive
        xp = jnp.pad(xc, ((0, 0), *padding, (0, 0)))
        patches = _patches(xp, (kh, kw), strides, (out_h, out_w))
        return _weight_grad(patches.reshape(-1, rows), gc.reshape(-1, cout))

    m = _patch_chunks(n, out_h * out_w * rows * x.dtype.itemsize)
    if m == 1:
        return chunk_grad(x, g)
    xs = x.reshape(n // m, m, *x.shape[1:])
    gs = g.reshape(n // m, m, *g.shape[1:])

    def body(k, acc):
        xc = jax.lax.dynamic_index_in_dim(xs, k, axis=1, keepdims=False)
        gc = jax.lax.dynamic_index_in_dim(gs, k, axis=1, keepdims=False)
        return acc + chunk_grad(xc, gc).astype(jnp.float32)

    return jax.lax.fori_loop(0, m, body, jnp.zeros((rows, cout), jnp.float32))


def _conv_bwd(strides, padding, residuals, g):
    x, w = residuals
    _, input_vjp = jax.vjp(lambda x: _lax_conv(x, w, strides, padding), x)
    (dx,) = input_vjp(g)
    dw = _conv_weight_grad(x, g, w.shape, strides, padding)
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
    logits = _mm32(q, jnp.swapaxes(k, -1, -2))
    if bias is not None:
        logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.swapaxes(_mm(weights, v), 1, 2), (q, k, v, weights, bias)


def _attention_bwd(residuals, d_out):
    q, k, v, weights, bias = residuals
    barrier, swap = jax.lax.optimization_barrier, lambda t: jnp.swapaxes(t, -1, -2)
    d_out = jnp.swapaxes(d_out, 1, 2)  # [b, h, q, d]
    d_weights = _mm32(d_out, barrier(swap(v)))
    d_v = _mm(barrier(swap(weights)), d_out)
    p = weights.astype(jnp.float32)
    d_logits = p * (d_weights - jnp.sum(d_weights * p, axis=-1, keepdims=True))
    d_bias = None if bias is None else _sum_to(d_logits, bias.shape).astype(bias.dtype)
    d_logits = d_logits.astype(q.dtype)
    d_q = _mm(d_logits, k)
    d_k = _mm(barrier(swap(d_logits)), q)
    return d_q, d_k, d_v, d_bias


@jax.custom_vjp
def _attention(q, k, v, bias):
    return _attention_fwd(q, k, v, bias)[0]


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None
              ) -> jax.Array:
    """``softmax(q k^T + bias) v`` per head: ``q, k, v [batch, heads, tokens, head_dim]``
    (``q`` already scaled), ``bias`` broadcastable to ``[batch, heads, tokens, tokens]`` ->
    ``[batch, tokens, heads, head_dim]``. On CPU (float32 or bfloat16 with a float32 softmax),
    with a hand-written VJP whose four batched products all take their operands row-major
    (XLA's own VJP of this graph runs two of them in its generic dot)."""
    if jax.default_backend() == "cpu" and q.dtype in (jnp.float32, jnp.bfloat16):
        return _attention(q, k, v, None if bias is None else bias.astype(jnp.float32))
    return jnp.einsum("bhqk,bhkd->bqhd", attention_weights(q, k, bias).astype(v.dtype), v)


def attention_weights(q: jax.Array, k: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``softmax(q k^T + bias)`` in float32, ``[batch, heads, tokens, tokens]`` (rows sum to 1);
    shapes as :func:`attention`."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1)


class PatchEmbed(nn.Conv):
    """A ViT's patch projection: :data:`Conv`, with the bias drawn as PyTorch's Conv2d draws it
    when ``torch_bias``: uniform(+-1/sqrt(fan_in)), the fan-in read from the kernel (``patch *
    patch * input channels``), created just before it. Same parameters as ``Conv``."""

    conv_general_dilated: Any = conv_general_dilated
    torch_bias: bool = False

    def param(self, name, init_fn, *args, **kwargs):
        if name == "bias" and self.torch_bias:
            bound = 1.0 / math.sqrt(math.prod(self.get_variable("params", "kernel").shape[:-1]))
            init_fn = functools.partial(_uniform, bound=bound)
        return super().param(name, init_fn, *args, **kwargs)


def _uniform(key, shape, dtype, bound: float):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

"""Dense layers and GELU as the transformers use them, arranged for XLA:CPU's matmul library.

Same maths and parameters as ``flax.linen.Dense`` and ``jax.nn.gelu(approximate=False)``; what
differs is how XLA:CPU runs them (measured in docs/benchmarks.md, "Performance"):

- the weight gradient ``dW = x^T g`` of a dense layer contracts over the batch*tokens dimension;
  left to itself, XLA:CPU runs it with its generic dot (not YNNPACK's fast matmul) behind
  transposed copies. :func:`dense_dot_general` gives ``nn.Dense`` a custom VJP that transposes
  the narrower operand explicitly (kept apart by an optimization barrier), so that both backward
  matmuls are row-major and run in YNNPACK. Other backends keep ``lax.dot_general``.
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


def _matmul_bwd(residuals, g: jax.Array):
    x, w = residuals
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    barrier = jax.lax.optimization_barrier
    if x2.shape[1] <= g2.shape[1]:  # transpose the narrower of x and g: [in, n] @ [n, out]
        dw = barrier(x2.T) @ g2
    else:  # ([out, n] @ [n, in])^T, the small result transposed after the matmul
        dw = barrier(barrier(g2.T) @ x2).T
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


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU ``x Phi(x) = x (1 + erf(x / sqrt 2)) / 2``."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(np.sqrt(0.5), x.dtype)))

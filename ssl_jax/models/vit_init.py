"""Initial weights of a ViT, by the paper a recipe follows (`ViT.init_scheme`).

- ``"mae"`` (MAE, and this project's default): Xavier-uniform on every Dense kernel, and on the
  patch projection's kernel flattened to ``[patch * patch * channels, dim]``.
- ``"dino"`` (DINO's ``_init_weights``): normal(0.02) on every Dense kernel; the patch projection
  keeps PyTorch's default Conv2d init, uniform(+-1/sqrt(fan_in)) (kaiming-uniform, a=sqrt(5)).
- ``"beit"`` (BEiT pre-training, ``modeling_pretrain.py``): every Dense kernel, the patch
  projection, the tokens and the masked-token head are trunc-normal(0.02) cut at +-1 standard
  deviation (its own ``trunc_normal_`` passes ``a=-std, b=std``), so their standard deviation is
  0.02 x 0.5396 = 0.0108; then ``fix_init_weight`` divides the two residual-branch outputs of
  block ``l`` (1-based; attention ``proj`` and MLP ``fc2``) by sqrt(2 l).

DINO calls timm's ``trunc_normal_(std=0.02)``, whose cut-off is at +-2 in absolute value, i.e.
100 standard deviations: a plain normal(0.02), which is what is used here. Biases start at zero
and LayerNorms at (1, 0) in all three, except the patch projection's bias for 'mae' and 'dino':
their ``_init_weights`` touch Linear and LayerNorm modules only, so that bias keeps PyTorch's
Conv2d default, uniform(+-1/sqrt(fan_in)) (``patch_bias_uniform``; BEiT zeroes it). Tokens
(cls, mask, learned position) are trunc-normal(0.02) cut at +-2 standard deviations for 'mae'
and 'dino', at +-1 for 'beit'.
"""

from __future__ import annotations

import math

from flax import linen as nn

INIT_SCHEMES = ("mae", "dino", "beit")
_OFFICIAL_STD = 0.02


def _beit_normal(std: float) -> nn.initializers.Initializer:
    """BEiT pre-training's ``trunc_normal_(std)``: a normal(std) cut at +-1 std."""
    return nn.initializers.truncated_normal(stddev=std, lower=-1.0, upper=1.0)


def check_init_scheme(scheme: str) -> None:
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"ViT init_scheme={scheme!r} is unknown; use one of {INIT_SCHEMES} "
                         "(the paper whose initialisation the recipe follows).")


def dense_init(scheme: str, residual_layer: int | None = None) -> nn.initializers.Initializer:
    """Kernel initialiser of a block's Dense layer. ``residual_layer``: the 1-based index of the
    block whose residual-branch output (attention ``proj``, MLP ``fc2``) this is; None for the
    others (``qkv``, ``fc1``)."""
    check_init_scheme(scheme)
    if scheme == "mae":
        return nn.initializers.xavier_uniform()
    if scheme == "dino":
        return nn.initializers.normal(stddev=_OFFICIAL_STD)
    scale = 1.0 if residual_layer is None else 1.0 / math.sqrt(2.0 * residual_layer)
    return _beit_normal(_OFFICIAL_STD * scale)


def patch_init(scheme: str) -> nn.initializers.Initializer:
    """Kernel initialiser of the patch projection, a ``[p, p, channels, dim]`` convolution."""
    check_init_scheme(scheme)
    if scheme == "mae":
        return nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1)
    if scheme == "beit":
        return _beit_normal(_OFFICIAL_STD)
    # PyTorch's Conv2d default: kaiming_uniform(a=sqrt(5)) = uniform(+-sqrt(1 / fan_in)).
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                            in_axis=(0, 1, 2), out_axis=-1)


def patch_bias_uniform(scheme: str) -> bool:
    """Whether the patch projection's bias starts as PyTorch's Conv2d bias, uniform(+-1 /
    sqrt(fan_in)) with ``fan_in = patch * patch * channels`` (else zero)."""
    check_init_scheme(scheme)
    return scheme in ("mae", "dino")


def token_init(scheme: str) -> nn.initializers.Initializer:
    """Initialiser of the cls, mask and learned position tokens (and of BEiT's token head)."""
    check_init_scheme(scheme)
    if scheme == "beit":
        return _beit_normal(_OFFICIAL_STD)
    return nn.initializers.truncated_normal(stddev=_OFFICIAL_STD)

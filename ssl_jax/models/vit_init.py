"""Initial weights of a ViT, by the paper a recipe follows (`ViT.init_scheme`).

- ``"mae"`` (MAE, and this project's default): Xavier-uniform on every Dense kernel, and on the
  patch projection's kernel flattened to ``[patch * patch * channels, dim]``.
- ``"dino"`` (DINO's ``_init_weights``): normal(0.02) on every Dense kernel; the patch projection
  keeps PyTorch's default Conv2d init, uniform(+-1/sqrt(fan_in)) (kaiming-uniform, a=sqrt(5)).
- ``"beit"``: DINO's scheme, then BEiT's ``fix_init_weight``: the two residual-branch outputs of
  block ``l`` (1-based; attention ``proj`` and MLP ``fc2``) are divided by sqrt(2 l).

The official code calls timm's ``trunc_normal_(std=0.02)``, whose cut-off is at +-2 in absolute
value, i.e. 100 standard deviations: a plain normal(0.02), which is what is used here. Biases
start at zero and LayerNorms at (1, 0) in all three. Tokens (cls, mask, learned position) keep
trunc-normal(0.02) in every scheme, as all three papers do.
"""

from __future__ import annotations

import math

from flax import linen as nn

INIT_SCHEMES = ("mae", "dino", "beit")
_OFFICIAL_STD = 0.02


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
    std = _OFFICIAL_STD
    if scheme == "beit" and residual_layer is not None:
        std /= math.sqrt(2.0 * residual_layer)
    return nn.initializers.normal(stddev=std)


def patch_init(scheme: str) -> nn.initializers.Initializer:
    """Kernel initialiser of the patch projection, a ``[p, p, channels, dim]`` convolution."""
    check_init_scheme(scheme)
    if scheme == "mae":
        return nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1)
    # PyTorch's Conv2d default: kaiming_uniform(a=sqrt(5)) = uniform(+-sqrt(1 / fan_in)).
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                            in_axis=(0, 1, 2), out_axis=-1)

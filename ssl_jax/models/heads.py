"""Heads on top of encoder features: projection MLP, DINO head, MAE decoder, linear classifier."""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.models.layers import Dense, matmul_float32
from ssl_jax.models.vit import LN_EPSILON, EncoderBlock, dense_kernel_init, sincos_2d_pos_embed


class ProjectionMLP(nn.Module):
    """SimCLR-v2 projection head g(h) (Chen et al., 2020b).

    With BatchNorm, each of the `num_layers - 1` hidden layers is Dense (no bias) -> BN -> ReLU
    and the last is Dense (no bias) -> BN without centring (`use_bias=False`, as SimCLR v2's
    code), no ReLU. Without BatchNorm: Dense (bias) -> ReLU hidden layers, last Dense with bias.

    `__call__(x [batch, d], train) -> [batch, out_dim]` (float32). BatchNorm statistics are in
    'batch_stats' and update only with `train=True`.
    """

    hidden_dim: int
    out_dim: int
    num_layers: int = 2
    use_bn: bool = True
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        if self.num_layers < 1:
            raise ValueError(f"ProjectionMLP num_layers={self.num_layers} must be >= 1.")
        chex.assert_rank(x, 2)
        batch = x.shape[0]
        x = x.astype(self.dtype)
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            width = self.out_dim if last else self.hidden_dim
            x = Dense(width, use_bias=not self.use_bn, dtype=self.dtype, name=f"dense{i}")(x)
            if self.use_bn:
                x = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=self.bn_momentum,
                    epsilon=self.bn_epsilon,
                    use_bias=not last,
                    dtype=self.dtype,
                    axis_name=self.bn_axis_name,
                    name=f"bn{i}",
                )(x)
            if not last:
                x = nn.relu(x)
        x = x.astype(jnp.float32)
        chex.assert_shape(x, (batch, self.out_dim))
        return x


class WeightNormDense(nn.Module):
    """Weight-normalised linear layer without bias (Salimans & Kingma 2016), as DINO's last layer.

    ``W[:, j] = g_j * v[:, j] / ||v[:, j]||``: a direction ``v`` (parameter ``kernel_v``,
    ``[in, features]``) and a per-output gain ``g`` (parameter ``gain``, initialised to 1). With
    ``fix_gain`` there is no gain parameter: ``g = 1`` always (DINO's ``norm_last_layer``).
    ``[batch, in] -> [batch, features]`` float32, the product in ``dtype`` accumulated in
    float32.
    """

    features: int
    fix_gain: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        # PyTorch's default Linear init, U(+-1/sqrt(in)); only the direction matters.
        init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        v = self.param("kernel_v", init, (x.shape[-1], self.features))
        w = v / jnp.maximum(jnp.linalg.norm(v, axis=0, keepdims=True), 1e-12)
        if not self.fix_gain:
            w = w * self.param("gain", nn.initializers.ones, (self.features,))
        return matmul_float32(x.astype(self.dtype), w.astype(self.dtype))


class DINOHead(nn.Module):
    """The DINO projection head (Caron et al. 2021): MLP, L2 normalisation, weight-normed layer.

    ``num_layers - 1`` hidden layers Dense(hidden_dim) -> [BatchNorm] -> GELU, a Dense to
    ``bottleneck_dim``, ``x / ||x||``, then :class:`WeightNormDense` to ``out_dim`` = K
    (65536 for ImageNet), with its gain fixed to 1 when ``norm_last_layer``. Dense layers are
    initialised with trunc-normal(0.02) and zero bias, as DINO's code.

    ``__call__(x [batch, d], train) -> [batch, out_dim]`` float32 logits.
    """

    out_dim: int
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    use_bn: bool = False
    norm_last_layer: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        if self.num_layers < 1:
            raise ValueError(f"DINOHead num_layers={self.num_layers} must be >= 1.")
        chex.assert_rank(x, 2)
        batch = x.shape[0]
        x = x.astype(self.dtype)
        init = nn.initializers.truncated_normal(stddev=0.02)
        for i in range(self.num_layers - 1):
            x = Dense(self.hidden_dim, dtype=self.dtype, kernel_init=init, name=f"dense{i}")(x)
            if self.use_bn:
                x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, name=f"bn{i}")(x)
            x = nn.gelu(x, approximate=False)
        x = Dense(self.bottleneck_dim, dtype=self.dtype, kernel_init=init,
                     name=f"dense{self.num_layers - 1}")(x)
        x = x.astype(jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        x = WeightNormDense(self.out_dim, fix_gain=self.norm_last_layer, dtype=self.dtype,
                            name="last_layer")(x).astype(jnp.float32)
        chex.assert_shape(x, (batch, self.out_dim))
        return x


class MAEDecoder(nn.Module):
    """MAE's light decoder (He et al. 2022, Sec. 3): predicts the pixels of every patch.

    The encoded visible tokens are projected to the decoder width; a shared learnable mask
    token fills every masked position; ``ids_restore`` puts the ``[visible; masked]`` sequence
    back in patch order; fixed 2-D sin-cos position embeddings (zero for the cls token) are
    added; ``depth`` pre-norm transformer blocks, a LayerNorm and a linear layer give
    ``patch_dim = patch * patch * channels`` values per patch.

    ``__call__(tokens [batch, 1 + n_keep, enc_dim] (cls first), ids_restore [batch, N])`` ->
    ``[batch, N, patch_dim]`` float32 in patch order (the cls token's output is dropped).
    """

    grid: tuple[int, int]
    patch_dim: int
    dim: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, ids_restore: jnp.ndarray) -> jnp.ndarray:
        chex.assert_rank([tokens, ids_restore], [3, 2])
        batch, num_patches = ids_restore.shape
        chex.assert_equal(num_patches, self.grid[0] * self.grid[1])
        x = Dense(self.dim, dtype=self.dtype, kernel_init=dense_kernel_init,
                     name="embed")(tokens.astype(self.dtype))
        cls, visible = x[:, :1], x[:, 1:]
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.dim))
        fill = jnp.broadcast_to(mask_token.astype(x.dtype),
                                (batch, num_patches - visible.shape[1], self.dim))
        x = jnp.concatenate([visible, fill], axis=1)
        x = jnp.take_along_axis(x, ids_restore[:, :, None], axis=1)  # back in patch order
        x = x + jnp.asarray(sincos_2d_pos_embed(self.dim, self.grid))[None].astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1)  # the cls token's position embedding is 0
        for i in range(self.depth):
            x = EncoderBlock(self.dim, self.num_heads, self.mlp_ratio, drop_path=0.0,
                             layer_scale_init=None, dtype=self.dtype, name=f"block{i}")(x, False)
        x = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, name="norm")(x)
        x = Dense(self.patch_dim, dtype=self.dtype, kernel_init=dense_kernel_init,
                     name="pred")(x[:, 1:])
        x = x.astype(jnp.float32)
        chex.assert_shape(x, (batch, num_patches, self.patch_dim))
        return x


class LinearClassifier(nn.Module):
    """Linear layer, zero-initialised: `[batch, d] -> [batch, num_classes]` logits."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        chex.assert_rank(x, 2)
        logits = Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="fc")(x)
        chex.assert_shape(logits, (x.shape[0], self.num_classes))
        return logits

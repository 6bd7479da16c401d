"""Generic heads on encoder features: the projection/prediction MLP (SimCLR, BYOL, MoCo), the
linear classifier and the upsampling decoder of a spatial feature map (colorization, inpainting).
A head that belongs to one method (DINO's head, MAE's decoder) lives in that method's file."""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_jax.models.layers import Conv, Dense


class ProjectionMLP(nn.Module):
    """The projection MLP g(h): SimCLR v2's head (Chen et al., 2020b), and with
    ``last_bn=False`` BYOL's projector and predictor (Grill et al. 2020).

    With BatchNorm, each of the `num_layers - 1` hidden layers is Dense (no bias) -> BN -> ReLU
    and the last is Dense (no bias) -> BN without centring (`use_bias=False`, as SimCLR v2's
    code), no ReLU; with ``last_bn_scale=False`` that BN has no scale either (MoCo v3's
    ``BatchNorm1d(affine=False)``); with ``last_bn=False`` the last is a plain Dense with bias
    (BYOL's MLP: Linear -> BN -> ReLU -> Linear; MoCo v3's ResNet predictor). Without
    BatchNorm: Dense (bias) -> ReLU hidden layers, last Dense with bias (MoCo v2's head).

    `__call__(x [batch, d], train) -> [batch, out_dim]` (float32). BatchNorm statistics are in
    'batch_stats' and update only with `train=True`.
    """

    hidden_dim: int
    out_dim: int
    num_layers: int = 2
    use_bn: bool = True
    last_bn: bool = True
    last_bn_scale: bool = True
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
            bn = self.use_bn and (self.last_bn or not last)
            x = Dense(width, use_bias=not bn, dtype=self.dtype, name=f"dense{i}")(x)
            if bn:
                x = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=self.bn_momentum,
                    epsilon=self.bn_epsilon,
                    use_bias=not last,
                    use_scale=self.last_bn_scale or not last,
                    dtype=self.dtype,
                    axis_name=self.bn_axis_name,
                    name=f"bn{i}",
                )(x)
            if not last:
                x = nn.relu(x)
        x = x.astype(jnp.float32)
        chex.assert_shape(x, (batch, self.out_dim))
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


class UpsamplingDecoder(nn.Module):
    """A dense prediction from an encoder's spatial feature map (colorization's ab head,
    inpainting's decoder): ``[batch, h', w', c] -> [batch, size, size, out_dim]`` (float32).

    With ``channel_fc`` first a channel-wise fully connected layer (the context encoder's, Pathak
    et al. 2016, Sec. 3.1: each channel's ``h' w'`` values mapped by a dense layer of its own, so
    that every position sees the whole map without the cost of a full dense layer), then a 1x1
    convolution to ``hidden_dim`` and ReLU; then, while the side is below ``size``, a bilinear
    x2 resize (the last one to exactly ``size``), a 3x3 convolution and ReLU; last a 1x1
    convolution to ``out_dim`` with bias and no activation.
    """

    out_dim: int
    size: int
    hidden_dim: int = 128
    channel_fc: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        chex.assert_rank(x, 4)
        batch, h, w, c = x.shape
        x = x.astype(self.dtype)
        if self.channel_fc:
            kernel = self.param("channel_fc", nn.initializers.lecun_normal(
                in_axis=1, out_axis=2, batch_axis=(0,)), (c, h * w, h * w), jnp.float32)
            bias = self.param("channel_fc_bias", nn.initializers.zeros, (c, h * w), jnp.float32)
            flat = x.reshape(batch, h * w, c)
            flat = jnp.einsum("bpc,cpq->bqc", flat, kernel.astype(self.dtype)) + bias.T
            x = nn.relu(flat.reshape(batch, h, w, c)).astype(self.dtype)
        x = nn.relu(Conv(self.hidden_dim, (1, 1), dtype=self.dtype, name="in_proj")(x))
        side, stage = h, 0
        while side < self.size:
            side = min(2 * side, self.size)
            x = jax.image.resize(x, (batch, side, side, self.hidden_dim), "bilinear")
            x = Conv(self.hidden_dim, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                     name=f"up{stage}")(x)
            x = nn.relu(x)
            stage += 1
        if side != self.size:  # a map larger than the output (not the case of the presets)
            x = jax.image.resize(x, (batch, self.size, self.size, self.hidden_dim), "bilinear")
        x = Conv(self.out_dim, (1, 1), dtype=self.dtype, name="out")(x).astype(jnp.float32)
        chex.assert_shape(x, (batch, self.size, self.size, self.out_dim))
        return x

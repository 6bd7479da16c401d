"""Generic heads on encoder features: the projection/prediction MLP (SimCLR, BYOL, MoCo) and the
linear classifier. A head that belongs to one method (DINO's head, MAE's decoder) lives in that
method's file."""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.models.layers import Dense


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

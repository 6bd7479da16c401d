"""ResNet v1.5 encoders (He et al., 2016), returning globally pooled features.

"v1.5" puts the stride-2 of a bottleneck block on its 3x3 convolution (as torchvision does),
not on the first 1x1. Padding is explicit and symmetric, so shapes and parameter counts match
torchvision's models: ResNet-50 has 23,508,032 parameters without its classifier.

Parameters are float32; `dtype` is the compute dtype. BatchNorm statistics live in the
`batch_stats` collection and are updated only when `train=True` (apply with
`mutable=['batch_stats']`). Inside `jax.jit` over global arrays the statistics are those of the
global batch; inside `jax.shard_map` set `bn_axis_name` to the data axis to sync them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.models.layers import Conv

ModuleDef = Callable[..., nn.Module]

BASE_WIDTHS = (64, 128, 256, 512)
BLOCK_EXPANSION = {"basic": 1, "bottleneck": 4}
RESNET_DEPTHS: dict[int, tuple[tuple[int, ...], str]] = {
    18: ((2, 2, 2, 2), "basic"),
    34: ((3, 4, 6, 3), "basic"),
    50: ((3, 4, 6, 3), "bottleneck"),
    101: ((3, 4, 23, 3), "bottleneck"),
    152: ((3, 8, 36, 3), "bottleneck"),
}

# Initial weights by the code a recipe follows (`ResNet.init_scheme`):
# - 'goyal': He-normal convolutions with fan-out (torchvision's `kaiming_normal_(mode='fan_out')`)
#   and the last BatchNorm scale of every block at 0, so each block starts as the identity
#   (Goyal et al. 2017; SimCLR's and BYOL's code);
# - 'torchvision': the same convolutions, every BatchNorm scale at 1 (torchvision's `resnet*`
#   default, zero_init_residual=False: the official MoCo code);
# - 'pytorch': `torch.nn.Conv2d`'s own default, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)),
#   scales at 1 (CIFAR ResNets that set no init, e.g. lightly's ResNetGenerator).
INIT_SCHEMES = ("goyal", "torchvision", "pytorch")
_HE_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
CONV_INITS = {"goyal": _HE_FAN_OUT, "torchvision": _HE_FAN_OUT,
              "pytorch": nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")}


def scaled_width(base: int, width_multiplier: float) -> int:
    """Channel count `base * width_multiplier`, rounded, at least 1."""
    return max(1, int(round(base * width_multiplier)))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    `[batch, h, w, c] -> [batch, h / strides, w / strides, filters]`.
    """

    filters: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    zero_init_residual: bool

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        last_scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        s = (self.strides, self.strides)
        y = self.conv(self.filters, (3, 3), s, padding=((1, 1), (1, 1)), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
        y = self.norm(scale_init=last_scale_init, name="bn2")(y)
        return nn.relu(_shortcut(x, y, s, self.conv, self.norm) + y)


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand to `4 * filters`, with a residual connection.

    `[batch, h, w, c] -> [batch, h / strides, w / strides, 4 * filters]`.
    """

    filters: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    zero_init_residual: bool

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        last_scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        s = (self.strides, self.strides)
        y = self.conv(self.filters, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), s, padding=((1, 1), (1, 1)), name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.filters * BLOCK_EXPANSION["bottleneck"], (1, 1), name="conv3")(y)
        y = self.norm(scale_init=last_scale_init, name="bn3")(y)
        return nn.relu(_shortcut(x, y, s, self.conv, self.norm) + y)


def _shortcut(
    x: jnp.ndarray, y: jnp.ndarray, strides: tuple[int, int], conv: ModuleDef, norm: ModuleDef
) -> jnp.ndarray:
    """Identity, or a strided 1x1 projection + BatchNorm when the shapes differ."""
    if x.shape == y.shape:
        return x
    x = conv(y.shape[-1], (1, 1), strides, name="proj_conv")(x)
    return norm(name="proj_bn")(x)


class ResNet(nn.Module):
    """ResNet v1.5 backbone without classifier.

    `__call__(x [batch, height, width, channels], train) -> [batch, num_features]` (float32):
    the global average pool of the last stage; with `return_map=True` the last stage's spatial
    map `[batch, h', w', num_features]` itself (dense pretext tasks: colorization, inpainting).

    Attributes:
      stage_sizes: blocks per stage, e.g. `(3, 4, 6, 3)`; stage `i` has base width `64 * 2**i`.
      block: 'basic' or 'bottleneck'.
      width_multiplier: scales every width (rounded, at least 1 channel).
      cifar_stem: 3x3 stride-1 first convolution and no max-pool (for 32x32 inputs);
        otherwise a 7x7 stride-2 convolution and a 3x3 stride-2 max-pool.
      init_scheme: initial weights as in 'goyal' (default: the last BatchNorm scale of every
        block at 0, so each block begins as the identity), 'torchvision' or 'pytorch' (see
        `INIT_SCHEMES`).
      bn_momentum, bn_epsilon: BatchNorm running-average momentum and epsilon.
      bn_axis_name: mapped axis to average batch statistics over inside `jax.shard_map`;
        None under `jax.jit` on global arrays.
      dtype: compute dtype (parameters stay float32).
    """

    stage_sizes: Sequence[int]
    block: str
    width_multiplier: float = 1.0
    cifar_stem: bool = False
    init_scheme: str = "goyal"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @property
    def stage_widths(self) -> tuple[int, ...]:
        """Base (pre-expansion) widths of the stages."""
        return tuple(
            scaled_width(64 * 2**i, self.width_multiplier) for i in range(len(self.stage_sizes))
        )

    @property
    def num_features(self) -> int:
        """Size of the pooled output features, known without initialising."""
        self._check_config()
        return self.stage_widths[-1] * BLOCK_EXPANSION[self.block]

    def _check_config(self) -> None:
        if self.block not in BLOCK_EXPANSION:
            raise ValueError(
                f"ResNet block={self.block!r} is unknown; use one of {sorted(BLOCK_EXPANSION)}."
            )
        if not self.stage_sizes or any(int(n) < 1 for n in self.stage_sizes):
            raise ValueError(
                f"ResNet stage_sizes={tuple(self.stage_sizes)} must be a non-empty sequence of "
                "positive block counts, e.g. (2, 2, 2, 2)."
            )
        if self.width_multiplier <= 0:
            raise ValueError(f"ResNet width_multiplier={self.width_multiplier} must be > 0.")
        if self.init_scheme not in INIT_SCHEMES:
            raise ValueError(f"ResNet init_scheme={self.init_scheme!r} is unknown; use one of "
                             f"{INIT_SCHEMES}.")

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool, return_map: bool = False) -> jnp.ndarray:
        self._check_config()
        chex.assert_rank(x, 4)
        batch = x.shape[0]
        conv = functools.partial(
            Conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=CONV_INITS[self.init_scheme],
        )
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            axis_name=self.bn_axis_name,
        )
        block_cls = BasicBlock if self.block == "basic" else BottleneckBlock

        x = x.astype(self.dtype)
        stem_width = scaled_width(64, self.width_multiplier)
        if self.cifar_stem:
            x = conv(stem_width, (3, 3), padding=((1, 1), (1, 1)), name="stem_conv")(x)
        else:
            x = conv(stem_width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="stem_conv")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        if not self.cifar_stem:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        for i, (num_blocks, width) in enumerate(
            zip(self.stage_sizes, self.stage_widths, strict=True)
        ):
            for j in range(int(num_blocks)):
                x = block_cls(
                    filters=width,
                    strides=2 if i > 0 and j == 0 else 1,
                    conv=conv,
                    norm=norm,
                    zero_init_residual=self.init_scheme == "goyal",
                    name=f"stage{i + 1}_block{j + 1}",
                )(x)

        if return_map:
            chex.assert_axis_dimension(x, 3, self.num_features)
            return x.astype(jnp.float32)
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        chex.assert_shape(features, (batch, self.num_features))
        return features


def resnet(depth: int, **kw: Any) -> ResNet:
    """ResNet-`depth` for depth in 18, 34, 50, 101, 152; `kw` sets the other `ResNet` fields."""
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"ResNet depth={depth} is unknown; use one of {sorted(RESNET_DEPTHS)}.")
    stage_sizes, block = RESNET_DEPTHS[depth]
    return ResNet(stage_sizes=stage_sizes, block=block, **kw)

"""Encoders and heads as Flax Linen modules; `create_encoder` builds an encoder by name.

Every encoder is applied as `module.apply(variables, x, train=bool, rngs=...)` on
`[batch, height, width, channels]` images and returns `[batch, encoder_dim(module)]` features.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ssl_jax.models.heads import LinearClassifier, ProjectionMLP
from ssl_jax.models.resnet import RESNET_DEPTHS, ResNet, resnet
from ssl_jax.models.vit import VIT_SIZES, ViT, vit

__all__ = [
    "LinearClassifier",
    "ProjectionMLP",
    "ResNet",
    "ViT",
    "create_encoder",
    "encoder_dim",
    "resnet",
    "vit",
]

_VIT_NAME = re.compile(r"vit_(" + "|".join(VIT_SIZES) + r")(\d+)")
# Fields fixed by the name or by `image_size`, never passed as keyword arguments.
_FIXED_FIELDS = {"parent", "name", "patch_size", "image_size"}

ENCODER_NAMES = tuple(f"resnet{d}" for d in sorted(RESNET_DEPTHS)) + tuple(
    f"vit_{s}{{patch}}" for s in VIT_SIZES
)


def _allowed_kwargs(cls: type[nn.Module]) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(cls) if f.name not in _FIXED_FIELDS)


def _check_kwargs(cls: type[nn.Module], name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    allowed = _allowed_kwargs(cls)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for encoder {name!r}; valid options: {allowed}."
        )
    if "dtype" in kwargs:
        kwargs = {**kwargs, "dtype": compute_dtype(kwargs["dtype"])}
    return kwargs


COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(name: Any) -> jnp.dtype:
    """The encoders' compute dtype from its name (``config.model.dtype``) or a dtype: float32 or
    bfloat16 (parameters stay float32 either way)."""
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in COMPUTE_DTYPES:
        raise ValueError(f"model dtype {name!r} is not a compute dtype of the encoders; use one "
                         f"of {COMPUTE_DTYPES} (parameters stay float32 either way).")
    return dtype


def create_encoder(name: str, image_size: int, **kwargs: Any) -> nn.Module:
    """Encoder by name: 'resnet18|34|50|101|152' or 'vit_{ti,s,b,l,h}{patch}' (e.g. 'vit_s16').

    `image_size` sets the ViT position-embedding grid (ResNets take any size). `kwargs` set
    the module's other fields (width_multiplier, cifar_stem, pos_embed, drop_path_rate, dtype
    as a dtype or its name, ...; for ViTs also dim/depth/num_heads to override the size).
    """
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be a positive number of pixels.")
    depth_match = re.fullmatch(r"resnet(\d+)", name)
    if depth_match and int(depth_match.group(1)) in RESNET_DEPTHS:
        return resnet(int(depth_match.group(1)), **_check_kwargs(ResNet, name, kwargs))
    vit_match = _VIT_NAME.fullmatch(name)
    if vit_match:
        size, patch = vit_match.group(1), int(vit_match.group(2))
        return vit(size, patch, image_size=image_size, **_check_kwargs(ViT, name, kwargs))
    raise ValueError(
        f"Unknown encoder {name!r}; valid names: {', '.join(ENCODER_NAMES)} "
        "(patch is the patch size, e.g. 'vit_b16')."
    )


def encoder_dim(module: nn.Module) -> int:
    """Size of the `[batch, features]` output of an encoder from `create_encoder`."""
    if isinstance(module, ResNet | ViT):
        return module.num_features
    raise TypeError(f"encoder_dim expects a ResNet or ViT module, got {type(module).__name__}.")

"""Defaults of the method protocol (:class:`ssl_jax.methods.Method`) that most methods share.

A method class derives from :class:`MethodBase`, names its config section and its keys, and
overrides what its paper changes::

    class SimCLR(MethodBase):
        CONFIG_KEYS = ("temperature", "proj_hidden_dim", ...)  # config.simclr.*

        def __init__(self, config, mesh, *, total_steps=0, steps_per_epoch=0):
            super().__init__(config, mesh, total_steps=total_steps,
                             steps_per_epoch=steps_per_epoch)  # checks keys, builds the encoder
            ...                                                 # heads, views

        def init(self, rng, batch): ...
        def augment(self, rng, images, image_hw=None): ...  # optional: see below
        def loss(self, params, extra, batch, rng, step): ...

The defaults: ``augment`` is one normalised view of ``config.aug.view1`` (MAE, SimMIM, the
dVAE), ``after_update`` is the identity (no EMA, no schedule), ``encoder_variables`` are
``params['encoder']`` with the collections at ``extra['encoder']`` (BatchNorm statistics) when
there are any (``with_encoder`` sets them), and ``encoder_input`` is the normalised image
itself.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from ssl_jax.config import ConfigError
from ssl_jax.data import augment
from ssl_jax.models import create_encoder
from ssl_jax.models.resnet import INIT_SCHEMES as RESNET_INIT_SCHEMES
from ssl_jax.models.vit_init import INIT_SCHEMES as VIT_INIT_SCHEMES


class MethodBase:
    """The protocol's defaults. Subclasses set :attr:`CONFIG_KEYS` (the keys of
    ``config.<method>``, checked here: an unknown or missing key is a ConfigError naming it) and
    define ``init`` and ``loss`` (and ``augment`` when one view of ``aug.view1`` is not it)."""

    CONFIG_KEYS: tuple[str, ...] = ()

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None, *,
                 total_steps: int = 0, steps_per_epoch: int = 0):
        """``total_steps`` / ``steps_per_epoch``: the run's length for schedules; 0 (unknown) in
        jobs that only evaluate a run, where methods skip checks against the run length."""
        self.config = config
        self.mesh = mesh
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.cfg = check_method_keys(config, self.CONFIG_KEYS)
        self.encoder: nn.Module = self.make_encoder()

    def make_encoder(self) -> nn.Module:
        """The network evaluation restores: by default :func:`build_encoder` of
        ``config.model``."""
        return build_encoder(self.config)

    def augment(self, rng: jax.Array, images: jax.Array, image_hw: jax.Array | None = None
                ) -> jax.Array:
        """uint8 ``[batch, h, w, 3]`` -> the normalised view ``config.aug.view1``."""
        view = augment.augment_view(rng, images, self.config.aug.view1, image_hw)
        return augment.normalize(view)

    def encoder_input(self, images: jax.Array) -> jax.Array:
        """What :attr:`encoder` sees for normalised images ``[batch, h, w, 3]`` (evaluation and
        fine-tuning go through this): the images themselves unless the method feeds its
        encoder something else (e.g. colorization's L channel)."""
        return images

    def after_update(self, params: Any, extra: Any, step: jax.Array) -> Any:
        """Nothing to update after the optimizer step."""
        del params, step
        return extra

    def encoder_variables(self, params: Any, extra: Any) -> dict[str, Any]:
        """The encoder's parameters at ``params['encoder']`` and its non-trained collections
        (BatchNorm statistics) at ``extra['encoder']`` when it has any."""
        state = extra.get("encoder", {}) if isinstance(extra, dict) else {}
        return {"params": params["encoder"], **state}

    def with_encoder(self, params: Any, extra: Any, variables: dict[str, Any]) -> tuple[Any, Any]:
        """``(params, extra)`` with the encoder's variables (the layout of
        :meth:`encoder_variables`) replaced by ``variables``: weights imported from a file or
        another run (``config.init_from``). Methods that keep more copies of the encoder (an
        EMA teacher) set them all, so that ``encoder_variables`` of the result is
        ``variables``."""
        params = {**params, "encoder": variables["params"]}
        state = {k: v for k, v in variables.items() if k != "params"}
        if state or (isinstance(extra, dict) and "encoder" in extra):
            extra = {**extra, "encoder": state}
        return params, extra


def check_method_keys(config: ml_collections.ConfigDict, keys: tuple[str, ...]
                      ) -> ml_collections.ConfigDict:
    """``config.<config.method>``, whose keys must be exactly ``keys``: a typo in a method key
    (an unknown one, or a missing one) is a ConfigError naming it. No keys: no section needed."""
    name = config.method
    if not keys:
        return config.get(name, ml_collections.ConfigDict())
    if name not in config:
        raise ConfigError(f"config.{name} is missing: the {name} method needs its keys "
                          f"{', '.join(keys)} (see configs/{name}.py)")
    section = config[name]
    unknown = sorted(set(section.keys()) - set(keys))
    missing = [k for k in keys if k not in section]
    if unknown:
        raise ConfigError(
            f"config.{name}.{unknown[0]} is not a key of the {name} method"
            + (f" (nor {', '.join(unknown[1:])})" if unknown[1:] else "")
            + f"; its keys are {', '.join(keys)}")
    if missing:
        raise ConfigError(f"config.{name}.{missing[0]} is missing; the {name} method needs "
                          f"{', '.join(keys)} (see configs/{name}.py)")
    return section


def build_encoder(config: ml_collections.ConfigDict) -> nn.Module:
    """The encoder of ``config.model`` for inputs of ``config.aug.view1.size`` px (a ViT's
    position grid); a ViT whose patches do not tile that size is a ConfigError naming both."""
    model = dict(config.model)
    name = model.pop("name")
    size = config.aug.view1.size
    schemes = (RESNET_INIT_SCHEMES if str(name).startswith("resnet")
               else VIT_INIT_SCHEMES if str(name).startswith("vit_") else None)
    if schemes and model.get("init_scheme", schemes[0]) not in schemes:
        raise ConfigError(f"config.model.init_scheme={model['init_scheme']!r} is unknown for "
                          f"{name}; use one of {', '.join(schemes)}")
    match = re.fullmatch(r"vit_[a-z]+(\d+)", str(name))
    if match and (int(match.group(1)) < 1 or size % int(match.group(1))):
        raise ConfigError(
            f"config.aug.view1.size={size} (the ViT's input side) must be a multiple of the "
            f"patch size {match.group(1)} of model.name={name!r}: change one of them")
    return create_encoder(name, image_size=size, **model)

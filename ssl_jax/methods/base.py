"""Defaults of the method protocol (:class:`ssl_jax.methods.Method`) that most methods share.

A method class derives from :class:`MethodBase` and overrides what its paper changes: the
identity ``after_update`` (no EMA, no schedule), the encoder's variables at
``params['encoder']``, and the encoder's input (the normalised image itself)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax


class MethodBase:
    """The protocol's defaults; a subclass sets :attr:`encoder` and defines ``init``,
    ``augment`` and ``loss``."""

    encoder: nn.Module

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

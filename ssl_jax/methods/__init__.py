"""Self-supervised methods. One module per method holds all of its maths.

The trainer knows no method by name: :func:`create` imports ``ssl_jax.methods.<config.method>``
and builds its ``METHOD`` class, ``METHOD(config, mesh, *, total_steps, steps_per_epoch)``, an
object with this interface (:class:`Method`; its defaults are in :mod:`ssl_jax.methods.base`,
the maths methods share in :mod:`ssl_jax.methods.ssl_math`). Every array the method needs
between steps (BatchNorm statistics, an EMA teacher, a centre, a queue) lives in its ``extra``
pytree, which is saved whole in every checkpoint beside the parameters.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from ssl_jax.config import ConfigError
from ssl_jax.models import COMPUTE_DTYPES, compute_dtype

Params = Any
Extra = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class Method(Protocol):
    """What the trainer and the evaluation job ask of a method."""

    encoder: nn.Module
    """The network evaluation restores: ``encoder.apply(variables, images, train=False)`` gives
    ``[batch, features]`` for normalised images ``[batch, height, width, 3]``."""

    def init(self, rng: jax.Array, batch: Batch) -> tuple[Params, Extra]:
        """Trainable parameters and the method's other state, from an example batch."""

    def augment(self, rng: jax.Array, images: jax.Array, image_hw: jax.Array | None = None
                ) -> Any:
        """The on-device augmentation of a uint8 ``[batch, h, w, 3]`` batch: the normalised
        view(s) that :meth:`loss` feeds its networks (benchmarks time it alone). ``image_hw``:
        the batch's ``image_hw`` field when the data has one (``data.train_region='whole'``:
        crops are drawn within each image's content), else None."""

    def loss(
        self, params: Params, extra: Extra, batch: Batch, rng: jax.Array, step: jax.Array
    ) -> tuple[jax.Array, tuple[Metrics, Extra]]:
        """Scalar loss of the global batch, metrics and the updated extra state (BN stats)."""

    def encoder_input(self, images: jax.Array) -> jax.Array:
        """What :attr:`encoder` sees for normalised images ``[batch, h, w, 3]`` (evaluation and
        fine-tuning feed the encoder through this)."""

    def after_update(self, params: Params, extra: Extra, step: jax.Array) -> Extra:
        """Updates that follow the optimizer step (EMA teacher, momentum schedules)."""

    def encoder_variables(self, params: Params, extra: Extra) -> dict[str, Any]:
        """The variables of :attr:`encoder` (``{'params': ..., 'batch_stats': ...}``)."""


def create(
    config: ml_collections.ConfigDict, mesh: Mesh | None, *, total_steps: int = 0,
    steps_per_epoch: int = 0,
) -> Method:
    """Builds the method named by ``config.method``: the class ``METHOD`` of the module
    ``ssl_jax/methods/<config.method>.py`` (a :class:`~ssl_jax.methods.base.MethodBase`).

    ``total_steps`` and ``steps_per_epoch`` give the run's length to methods whose schedules
    depend on it (EMA momentum, temperatures); jobs that only evaluate leave them at 0
    (unknown), and methods then skip checks of their schedules against the run length."""
    name = config.method
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        module = None
    if module is None or not hasattr(module, "METHOD"):
        raise ConfigError(
            f"config.method={name!r} is not a method of ssl_jax: expected a module "
            f"ssl_jax/methods/{name}.py defining METHOD (a MethodBase subclass)") from None
    model_dtype(config)
    return module.METHOD(config, mesh, total_steps=total_steps, steps_per_epoch=steps_per_epoch)


def model_dtype(config: ml_collections.ConfigDict) -> Any:
    """The encoder's compute dtype, ``config.model.dtype`` (float32 for runs saved before the
    key existed); a ConfigError names a bad one."""
    name = config.get("model", {}).get("dtype", "float32")
    try:
        return compute_dtype(name)
    except ValueError:
        raise ConfigError(
            f"config.model.dtype={name!r} is not a compute dtype of the encoders: use one of "
            f"{COMPUTE_DTYPES} (bfloat16 computes in bfloat16 with float32 parameters, norms, "
            "softmaxes and losses)") from None

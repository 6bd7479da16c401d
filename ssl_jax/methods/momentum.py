"""What the momentum-encoder methods (BYOL, MoCo v2, MoCo v3) share: an online network trained
by the optimizer and a momentum copy of its encoder and projector that follows it by an EMA.

    params = {'encoder', 'projector'[, 'predictor']}          # the online network
    extra  = {'state':        BatchNorm statistics of the online networks,
              'target':       {'encoder', 'projector'}: the momentum network's parameters,
              'target_state': its own BatchNorm statistics,
              ['frozen':      encoder parameters kept at their init (MoCo v3's patch projection)],
              ...the method's own (MoCo v2's queue)}

After every optimizer step the target follows ``xi <- m xi + (1 - m) theta``
(:func:`~ssl_jax.methods.ssl_math.ema`), with ``m`` constant or on a cosine from ``momentum`` to
1 over the run (``momentum_cosine``; :func:`~ssl_jax.methods.ssl_math.cosine_momentum`). The
target lives in ``extra``: no gradient and no optimizer reaches it, and it runs in training
mode under ``stop_gradient`` (:func:`~ssl_jax.methods.ssl_math.teacher_forward`: BatchNorm
normalises with batch statistics and updates the target's own running statistics). Each view
goes through the networks on its own, as in the papers' code (BatchNorm statistics per view).

Evaluation, fine-tuning and the pictures restore the **online** encoder (the papers evaluate
it); ``<method>.eval_encoder='momentum'`` selects the momentum encoder instead, also as an
evaluation override (``--config.byol.eval_encoder=momentum``: the state's layout is the same).

This module is not a method (it has no ``METHOD``); ``byol.py``, ``moco_v2.py`` and
``moco_v3.py`` derive from :class:`MomentumMethod`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from ssl_jax.config import ConfigError, require
from ssl_jax.data import multicrop
from ssl_jax.methods.base import MethodBase
from ssl_jax.methods.ssl_math import (
    apply_network,
    cosine_momentum,
    ema,
    split_variables,
    teacher_forward,
)
from ssl_jax.models.vit import ViT

EVAL_ENCODERS = ("online", "momentum")
TARGET_NETWORKS = ("encoder", "projector")


class MomentumMethod(MethodBase):
    """Online encoder + projector (+ predictor) in ``params``, their momentum copy in ``extra``.

    Subclasses set ``CONFIG_KEYS`` (with ``momentum``, ``momentum_cosine``, ``eval_encoder``),
    build ``self.projector`` (and ``self.predictor``, or None) in :meth:`make_heads`, and define
    ``loss``; :meth:`init_extra` adds their own state."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None, **run_length: int):
        super().__init__(config, mesh, **run_length)
        name, cfg = config.method, self.cfg
        require(0.0 <= cfg.momentum <= 1.0, f"{name}.momentum",
                f"is {cfg.momentum}: the momentum encoder's EMA coefficient must lie in [0, 1]")
        require(cfg.eval_encoder in EVAL_ENCODERS, f"{name}.eval_encoder",
                f"is {cfg.eval_encoder!r}: must be one of {EVAL_ENCODERS}")
        aug = config.aug
        require(aug.view2.size == aug.view1.size, "aug.view2.size",
                f"the two views must share one size: view1 is {aug.view1.size}, "
                f"view2 {aug.view2.size}")
        self.views = (aug.view1, aug.view2)
        # The momentum encoder has no stochastic depth (as DINO's teacher, MoCo v3's code).
        self.target_encoder = (self.encoder.clone(drop_path_rate=0.0)
                               if isinstance(self.encoder, ViT) else self.encoder)
        self.frozen: tuple[str, ...] = ()  # encoder submodules kept at init (MoCo v3)
        self.projector, self.predictor = self.make_heads()

    def make_heads(self) -> tuple[nn.Module, nn.Module | None]:
        """``(projector, predictor or None)``."""
        raise NotImplementedError

    def init_extra(self, rng: jax.Array) -> dict[str, Any]:
        """The method's own state beside the momentum network (MoCo v2: the queue)."""
        del rng
        return {}

    # --- Schedules -------------------------------------------------------------------------------
    def target_momentum(self, step: jax.Array) -> jax.Array:
        """m: ``momentum`` throughout, or with ``momentum_cosine`` a cosine from ``momentum`` at
        step 0 to 1 at the last step (BYOL's tau, MoCo v3's m)."""
        cfg = self.cfg
        if cfg.momentum_cosine:
            return cosine_momentum(step, cfg.momentum, max(self.total_steps, 1))
        return jnp.asarray(cfg.momentum, jnp.float32)

    # --- Networks --------------------------------------------------------------------------------
    def augment(self, rng: jax.Array, images: jax.Array, image_hw: jax.Array | None = None
                ) -> jax.Array:
        """``[batch, h, w, 3]`` uint8 -> ``[batch, 2, size, size, 3]`` normalised: view 1 and
        view 2 (each with its own config: BYOL's and MoCo v3's are asymmetric) of every image,
        next to each other on the device that holds the image."""
        views, _ = multicrop.multi_crop(rng, images, self.views, 2, image_hw=image_hw)
        return views

    def encoder_params(self, encoder_params: Any, extra: Any) -> Any:
        """The encoder's whole parameter tree: the trained (or momentum) parameters with the
        frozen ones of ``extra['frozen']``."""
        return {**encoder_params, **extra.get("frozen", {})}

    def online(self, params: Any, state: Any, extra: Any, x: jax.Array, rng: jax.Array | None,
               apply: Any = apply_network) -> tuple[jax.Array, jax.Array, Any]:
        """``x [n, s, s, 3]`` -> ``(prediction [n, d] (the projection without a predictor),
        encoder features [n, f], updated state)`` in training mode. ``apply`` runs each network
        (default :func:`apply_network`; MoCo v2 passes its grouped BatchNorm)."""
        feats, enc = apply(self.encoder, self.encoder_params(params["encoder"], extra),
                           state["encoder"], x, train=True, rng=rng)
        out, proj = apply(self.projector, params["projector"], state["projector"], feats,
                          train=True)
        new_state = {**state, "encoder": enc, "projector": proj}
        if self.predictor is not None:
            out, new_state["predictor"] = apply(self.predictor, params["predictor"],
                                                state["predictor"], out, train=True)
        return out, feats, new_state

    def target(self, extra: Any, state: Any, x: jax.Array, apply: Any = apply_network
               ) -> tuple[jax.Array, Any]:
        """The momentum network's projection ``[n, d]`` of ``x`` under ``stop_gradient``, and its
        updated BatchNorm state (training mode, as the papers' code runs it)."""
        target = extra["target"]
        feats, enc = teacher_forward(self.target_encoder,
                                     self.encoder_params(target["encoder"], extra),
                                     state["encoder"], x, apply=apply)
        z, proj = teacher_forward(self.projector, target["projector"], state["projector"], feats,
                                  apply=apply)
        return z, {"encoder": enc, "projector": proj}

    # --- The Method interface ----------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        k_enc, k_proj, k_pred, k_extra = jax.random.split(rng, 4)
        size = self.views[0].size
        x = jnp.zeros((batch["image"].shape[0], size, size, 3), jnp.float32)  # shapes only
        enc_params, enc_state = split_variables(
            self.encoder.init({"params": k_enc, "dropout": k_enc}, x, train=False))
        frozen = {key: enc_params.pop(key) for key in self.frozen}
        feats, _ = apply_network(self.encoder, {**enc_params, **frozen}, enc_state, x,
                                 train=False)
        proj_params, proj_state = split_variables(self.projector.init(k_proj, feats, train=False))
        params = {"encoder": enc_params, "projector": proj_params}
        state = {"encoder": enc_state, "projector": proj_state}
        if self.predictor is not None:
            z = self.projector.apply({"params": proj_params, **proj_state}, feats, train=False)
            params["predictor"], state["predictor"] = split_variables(
                self.predictor.init(k_pred, z, train=False))
        copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
        extra = {
            "state": state,
            # The momentum network starts as the online one (BYOL's and MoCo's code).
            "target": copy({key: params[key] for key in TARGET_NETWORKS}),
            "target_state": copy({key: state[key] for key in TARGET_NETWORKS}),
            **({"frozen": frozen} if frozen else {}),
            **self.init_extra(k_extra),
        }
        return params, extra

    def after_update(self, params: Any, extra: Any, step: jax.Array) -> Any:
        """The EMA of the momentum network's parameters (its BatchNorm statistics are its own)."""
        online = {key: params[key] for key in TARGET_NETWORKS}
        return {**extra, "target": ema(extra["target"], online, self.target_momentum(step))}

    def encoder_variables(self, params: Any, extra: Any) -> dict[str, Any]:
        """The online encoder (``eval_encoder='online'``, the papers' choice) or the momentum
        encoder (``'momentum'``), with its BatchNorm statistics and frozen parameters."""
        if self.cfg.eval_encoder == "momentum":
            encoder, state = extra["target"]["encoder"], extra["target_state"]["encoder"]
        else:
            encoder, state = params["encoder"], extra["state"]["encoder"]
        return {"params": self.encoder_params(encoder, extra), **state}

    def with_encoder(self, params: Any, extra: Any, variables: dict[str, Any]) -> tuple[Any, Any]:
        """The online and the momentum encoder both start from ``variables`` (the frozen
        parameters, MoCo v3's patch projection, go to ``extra['frozen']``)."""
        copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
        enc = dict(variables["params"])
        frozen = {key: enc.pop(key) for key in self.frozen}
        state = {k: v for k, v in variables.items() if k != "params"}
        extra = {**extra, "state": {**extra["state"], "encoder": state},
                 "target": {**extra["target"], "encoder": copy(enc)},
                 "target_state": {**extra["target_state"], "encoder": copy(state)},
                 **({"frozen": frozen} if frozen else {})}
        return {**params, "encoder": enc}, extra


def refuse_predictor_keys(config: ml_collections.ConfigDict, paper: str) -> None:
    """A ``pred_*`` key in ``config.<method>`` of a method without a predictor is a ConfigError
    naming the key (rather than only 'not a key of the method')."""
    section = config.get(config.method) or {}
    for key in section:
        if key.startswith("pred"):
            raise ConfigError(
                f"config.{config.method}.{key}: {paper} has no predictor (BYOL and MoCo v3 do: "
                "configs/byol.py, configs/moco_v3.py); drop the key")

"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised
Learning"): an online network predicts a momentum target's projection of another view, with no
negatives.

The online network is encoder f_theta, projector g_theta (MLP 4096-256, BatchNorm in the hidden
layer) and predictor q_theta (the same MLP shape on the projection); the target is an EMA of the
online encoder and projector, ``xi <- tau xi + (1 - tau) theta`` after every step, ``tau`` on a
cosine from ``momentum`` (0.996) to 1 over the run. For the two views v, v' of an image
(BYOL's asymmetric augmentations: blur p=1.0 / 0.1, solarize p=0 / 0.2), eq. (2) of the paper::

    L(v, v') = || q(z_theta) / ||q(z_theta)|| - z'_xi / ||z'_xi|| ||^2
             = 2 - 2 cos(q_theta(g_theta(f_theta(v))), sg(g_xi(f_xi(v'))))

symmetrised, ``L_BYOL = L(v, v') + L(v', v)``, averaged over the **global** batch (BatchNorm
statistics are those of the global batch too: the step runs under ``jax.jit`` over arrays sharded
on the mesh). No gradient reaches the target (``sg``); the target's BatchNorm statistics are its
own. The structure shared with MoCo (networks, EMA, which encoder evaluation restores) is in
:mod:`ssl_jax.methods.momentum`.

Config keys: ``config.byol.{proj_hidden_dim, proj_out_dim, pred_hidden_dim, momentum,
momentum_cosine, eval_encoder}``, ``config.aug.{view1, view2}``, ``config.model``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax.methods.momentum import MomentumMethod
from ssl_jax.methods.ssl_math import feature_std, l2_normalize
from ssl_jax.models.heads import ProjectionMLP


def byol_loss(prediction: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``mean_i (2 - 2 cos(p_i, sg(z_i)))`` over ``prediction, target [N, d]`` (eq. 2), and the
    mean cosine. No gradient reaches ``target``."""
    p = l2_normalize(prediction)
    z = jax.lax.stop_gradient(l2_normalize(target))
    cosine = jnp.sum(p * z, axis=-1)
    return jnp.mean(2.0 - 2.0 * cosine), jnp.mean(cosine)


class BYOL(MomentumMethod):
    """Online encoder + projector + predictor (params), EMA target encoder + projector (extra)."""

    CONFIG_KEYS = ("proj_hidden_dim", "proj_out_dim", "pred_hidden_dim", "momentum",
                   "momentum_cosine", "eval_encoder")

    def make_heads(self):
        cfg, dtype = self.cfg, self.encoder.dtype
        # BYOL's MLP: Linear -> BN -> ReLU -> Linear, for the projector and the predictor.
        projector = ProjectionMLP(hidden_dim=cfg.proj_hidden_dim, out_dim=cfg.proj_out_dim,
                                  num_layers=2, last_bn=False, dtype=dtype)
        predictor = ProjectionMLP(hidden_dim=cfg.pred_hidden_dim, out_dim=cfg.proj_out_dim,
                                  num_layers=2, last_bn=False, dtype=dtype)
        return projector, predictor

    def loss(self, params, extra, batch, rng, step):
        k_aug, *k_drop = jax.random.split(rng, 3)
        views = self.augment(k_aug, batch["image"], batch.get("image_hw"))
        state, target_state = extra["state"], extra["target_state"]
        predictions, targets, feats = [], [], []
        for i in range(2):  # each view on its own through the networks, as BYOL's code
            p, f, state = self.online(params, state, extra, views[:, i], k_drop[i])
            z, target_state = self.target(extra, target_state, views[:, i])
            predictions.append(p)
            targets.append(z)
            feats.append(f)
        loss_12, cos_12 = byol_loss(predictions[0], targets[1])
        loss_21, cos_21 = byol_loss(predictions[1], targets[0])
        metrics = {"byol_cosine": (cos_12 + cos_21) / 2,
                   "feature_std": feature_std(feats[0]),
                   "target_momentum": self.target_momentum(step)}
        return loss_12 + loss_21, (metrics, {**extra, "state": state,
                                             "target_state": target_state})


METHOD = BYOL

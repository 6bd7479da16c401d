"""MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers"): a query encoder with projector and predictor against a momentum encoder, the
negatives from the **global** batch, no queue.

The query network is encoder f_q, projector (an MLP of ``proj_layers`` layers 4096-256, BN after
every layer, the last BN without affine parameters: 3 layers for ViTs, 2 for ResNets) and
predictor (2 layers 4096-256, BN; the last BN for ViTs only); the momentum network f_k (encoder
+ projector) follows ``theta_k <- m theta_k + (1 - m) theta_q`` after every step, m on a cosine
from ``momentum`` (0.99) to 1 over the run. Algorithm 1 of the paper, with the official code's
``2 tau`` factor::

    q1, q2 = pred(f_q(x1)), pred(f_q(x2));  k1, k2 = sg(f_k(x1)), sg(f_k(x2))
    L = ctr(q1, k2) + ctr(q2, k1)
    ctr(q, k) = 2 tau * CrossEntropy(q . k_all^T / tau, labels = own row)   # q, k normalised

where ``k_all`` are the keys of the whole global batch (all devices: all-gathered inside
``jax.shard_map`` by :func:`~ssl_jax.methods.ssl_math.info_nce`), tau = 0.2. BatchNorm is global
(SyncBN, as the official code): with the negatives from the same batch as the positive, a
batch-level BN signature cannot tell them apart, so MoCo v3 needs no shuffling BN (unlike MoCo v2,
whose negatives come from older batches).

The paper's stability trick for ViTs: the patch projection frozen at its random init
(``freeze_patch_embed``). The frozen parameters are not trained parameters at all: they live in
``extra['frozen']`` (no gradient, no weight decay, no optimizer state), shared by the query and
the momentum encoder (the EMA of two equal constants), and :meth:`encoder_variables` hands the
whole encoder to evaluation and fine-tuning. A ResNet has no patch projection: the switch is a
ConfigError there. The momentum follows the shared schedule at the step just taken
(:mod:`ssl_jax.methods.momentum`); the official code applies ``m`` of the next iteration before
its forward pass, a difference of one step in the schedule.

Config keys: ``config.moco_v3.{temperature, proj_hidden_dim, proj_out_dim, proj_layers,
pred_hidden_dim, pred_last_bn, momentum, momentum_cosine, freeze_patch_embed, eval_encoder}``,
``config.aug.{view1, view2}``, ``config.model``.
"""

from __future__ import annotations

import jax
import ml_collections
from jax.sharding import Mesh

from ssl_jax.config import require
from ssl_jax.methods.momentum import MomentumMethod
from ssl_jax.methods.ssl_math import feature_std, info_nce
from ssl_jax.models.heads import ProjectionMLP
from ssl_jax.models.vit import ViT


class MoCoV3(MomentumMethod):
    """Query encoder + projector + predictor (params), momentum encoder + projector (extra)."""

    CONFIG_KEYS = ("temperature", "proj_hidden_dim", "proj_out_dim", "proj_layers",
                   "pred_hidden_dim", "pred_last_bn", "momentum", "momentum_cosine",
                   "freeze_patch_embed", "eval_encoder")

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None, **run_length: int):
        super().__init__(config, mesh, **run_length)
        cfg = self.cfg
        require(cfg.temperature > 0, "moco_v3.temperature", f"is {cfg.temperature}: must be > 0")
        require(cfg.proj_layers >= 1, "moco_v3.proj_layers", "must be >= 1")
        if cfg.freeze_patch_embed:
            require(isinstance(self.encoder, ViT), "moco_v3.freeze_patch_embed",
                    f"model.name={config.model.name!r} has no patch projection to freeze (a "
                    "ViT's stability trick); set freeze_patch_embed=False for a ResNet")
            self.frozen = ("patch_embed",)

    def make_heads(self):
        cfg, dtype = self.cfg, self.encoder.dtype
        # Linear (no bias) -> BN -> ReLU hidden layers; the last Linear -> BN(affine=False).
        projector = ProjectionMLP(hidden_dim=cfg.proj_hidden_dim, out_dim=cfg.proj_out_dim,
                                  num_layers=cfg.proj_layers, last_bn_scale=False, dtype=dtype)
        predictor = ProjectionMLP(hidden_dim=cfg.pred_hidden_dim, out_dim=cfg.proj_out_dim,
                                  num_layers=2, last_bn=cfg.pred_last_bn, last_bn_scale=False,
                                  dtype=dtype)
        return projector, predictor

    def loss(self, params, extra, batch, rng, step):
        temp = self.cfg.temperature
        k_aug, *k_drop = jax.random.split(rng, 3)
        views = self.augment(k_aug, batch["image"], batch.get("image_hw"))
        state, target_state = extra["state"], extra["target_state"]
        queries, keys, feats = [], [], []
        for i in range(2):  # each view on its own through the networks, as the official code
            q, f, state = self.online(params, state, extra, views[:, i], k_drop[i])
            k, target_state = self.target(extra, target_state, views[:, i])
            queries.append(q)
            keys.append(k)
            feats.append(f)
        loss_12, acc_12 = info_nce(queries[0], keys[1], temp, self.mesh)
        loss_21, acc_21 = info_nce(queries[1], keys[0], temp, self.mesh)
        metrics = {"contrastive_acc": (acc_12 + acc_21) / 2, "feature_std": feature_std(feats[0]),
                   "target_momentum": self.target_momentum(step)}
        loss = 2 * temp * (loss_12 + loss_21)
        return loss, (metrics, {**extra, "state": state, "target_state": target_state})


METHOD = MoCoV3

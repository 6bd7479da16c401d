"""MoCo v2 (Chen, Fan, Girshick, He 2020, "Improved Baselines with Momentum Contrastive
Learning"; MoCo: He et al. 2020): contrastive learning against a queue of keys from a momentum
encoder.

A query encoder f_q (encoder + 2-layer MLP head 2048-128, no BatchNorm in the head) and a key
encoder f_k, its EMA ``theta_k <- m theta_k + (1 - m) theta_q`` (m = 0.999), see two views of
every image. Algorithm 1 of the MoCo paper, with the queue's ``K`` keys as the only negatives::

    q = f_q(x_q), k = sg(f_k(x_k))                                   # [N, C], L2-normalised
    logits = [q . k, q . queue^T] / T                                # [N, 1 + K], label 0
    L = CrossEntropy(logits, 0),  then enqueue(k), dequeue the oldest N keys

with T = 0.2 and K = 65536. ``symmetric=True`` (lightly's CIFAR-10 benchmark) adds the loss with
the views swapped, averages the two and enqueues both views' keys. The queue ``[K, C]`` and its
pointer are part of the method's state (``extra['queue']``, ``extra['queue_ptr']``), saved in
every checkpoint; it is enqueued with the keys of the **global** batch in the global batch's
order (:func:`~ssl_jax.methods.ssl_math.enqueue` under ``jax.jit`` over the sharded batch), so
1 and N devices hold the same queue. ``queue_size`` must be a multiple of the keys enqueued per
step (the global batch, twice it with ``symmetric``).

**The BatchNorm leak, and how it is closed here.** With BatchNorm in the encoders, a positive
pair shares the statistics of one batch: the query's and its key's batch hold the same images.
The model can then tell the current batch's key (the positive) from the queue's older keys by
that batch-level signature alone, and lowers the loss without learning good features (MoCo,
section 3.3). MoCo's remedy is shuffling BN: each GPU normalises its own sub-batch, and the key
encoder's sub-batches are of a random permutation of the batch, so a query and its key are
normalised with statistics of different sets of images. Here BatchNorm is global by default
(the step is one ``jax.jit`` over the mesh), which does not close the leak, and a permutation
across devices alone changes nothing under global statistics. So both encoders normalise in
``bn_groups`` groups of the **global** batch (:func:`~ssl_jax.methods.ssl_math.
apply_network_in_groups`: contiguous groups of ``B / bn_groups`` images, the official code's
per-GPU sub-batches with ``bn_groups`` = its 8 GPUs), the query encoder's in the batch's order,
the key encoder's after a random permutation of the global batch drawn from the step's key
(undone after the key encoder). The groups are fixed by the batch order, not by the devices, so
the maths is the same on 1 and N devices (tests/test_moco.py checks it, and that a key's
features depend on its permuted group, not on its query's group). ``bn_groups=1`` turns this
off (global BatchNorm, leak-prone). Networks without BatchNorm (a ViT, the head) are unaffected.
The running statistics move by the mean of the groups' updates.

Config keys: ``config.moco_v2.{temperature, proj_hidden_dim, proj_out_dim, queue_size,
momentum, momentum_cosine, bn_groups, symmetric, eval_encoder}``, ``config.aug.{view1, view2}``,
``config.model``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from ssl_jax.config import require
from ssl_jax.methods.momentum import MomentumMethod, refuse_predictor_keys
from ssl_jax.methods.ssl_math import (
    apply_network_in_groups,
    enqueue,
    feature_std,
    l2_normalize,
    queue_info_nce,
)
from ssl_jax.models.heads import ProjectionMLP


class MoCoV2(MomentumMethod):
    """Query encoder + MLP head (params), momentum key encoder and the key queue (extra)."""

    CONFIG_KEYS = ("temperature", "proj_hidden_dim", "proj_out_dim", "queue_size", "momentum",
                   "momentum_cosine", "bn_groups", "symmetric", "eval_encoder")

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None, **run_length: int):
        refuse_predictor_keys(config, "MoCo v2")
        super().__init__(config, mesh, **run_length)
        cfg, batch = self.cfg, config.batch_size
        require(cfg.temperature > 0, "moco_v2.temperature", f"is {cfg.temperature}: must be > 0")
        self.keys_per_step = batch * (2 if cfg.symmetric else 1)
        require(cfg.queue_size > 0 and cfg.queue_size % self.keys_per_step == 0,
                "moco_v2.queue_size",
                f"K={cfg.queue_size} must be a positive multiple of the {self.keys_per_step} keys "
                f"enqueued per step (the global batch_size {batch}"
                + (", twice for symmetric=True)" if cfg.symmetric else ")")
                + f", e.g. {max(cfg.queue_size // self.keys_per_step, 1) * self.keys_per_step}")
        require(cfg.bn_groups >= 1 and batch % cfg.bn_groups == 0, "moco_v2.bn_groups",
                f"is {cfg.bn_groups}: must be >= 1 and divide the global batch_size {batch}")
        self.grouped = functools.partial(apply_network_in_groups, groups=cfg.bn_groups)

    def make_heads(self):
        # MoCo v2's MLP head: Linear(2048) -> ReLU -> Linear(128), no BatchNorm.
        cfg = self.cfg
        return ProjectionMLP(hidden_dim=cfg.proj_hidden_dim, out_dim=cfg.proj_out_dim,
                             num_layers=2, use_bn=False, dtype=self.encoder.dtype), None

    def init_extra(self, rng: jax.Array) -> dict[str, Any]:
        """A queue of random unit keys (MoCo's ``randn`` normalised) and its pointer at row 0."""
        cfg = self.cfg
        queue = jax.random.normal(rng, (cfg.queue_size, cfg.proj_out_dim), jnp.float32)
        return {"queue": l2_normalize(queue), "queue_ptr": jnp.zeros((), jnp.int32)}

    def keys(self, extra: Any, state: Any, x: jax.Array, rng: jax.Array) -> tuple[jax.Array, Any]:
        """The key encoder's projections ``[n, C]`` of ``x [n, ...]`` in the batch's order, its
        BatchNorm groups taken over a random permutation of the batch (shuffling BN)."""
        perm = jax.random.permutation(rng, x.shape[0])
        k, state = self.target(extra, state, x[perm], apply=self.grouped)
        return k[jnp.argsort(perm)], state

    def loss(self, params, extra, batch, rng, step):
        cfg = self.cfg
        k_aug, *rngs = jax.random.split(rng, 5)
        views = self.augment(k_aug, batch["image"], batch.get("image_hw"))
        pairs = ((0, 1), (1, 0)) if cfg.symmetric else ((0, 1),)
        state, target_state = extra["state"], extra["target_state"]
        losses, accuracies, new_keys, features = [], [], [], []
        for i, (q_view, k_view) in enumerate(pairs):
            q, feats, state = self.online(params, state, extra, views[:, q_view], rngs[2 * i],
                                          apply=self.grouped)
            k, target_state = self.keys(extra, target_state, views[:, k_view], rngs[2 * i + 1])
            loss, accuracy = queue_info_nce(q, k, extra["queue"], cfg.temperature)
            losses.append(loss)
            accuracies.append(accuracy)
            new_keys.append(l2_normalize(k))
            features.append(feats)
        queue, ptr = enqueue(extra["queue"], extra["queue_ptr"], jnp.concatenate(new_keys))
        metrics = {"contrastive_acc": sum(accuracies) / len(pairs),
                   "feature_std": feature_std(features[0]),
                   "target_momentum": self.target_momentum(step)}
        new_extra = {**extra, "state": state, "target_state": target_state, "queue": queue,
                     "queue_ptr": ptr}
        return sum(losses) / len(pairs), (metrics, new_extra)


METHOD = MoCoV2

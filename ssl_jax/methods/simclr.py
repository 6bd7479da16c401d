"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations"), with the projection head of SimCLR v2.

Two augmented views of every image go through the encoder f and the projection head g; the
NT-Xent loss pulls the two views of an image together against the ``2N - 2`` other views of the
**global** batch (all devices), eq. (1) of the paper::

    l(i, j) = -log  exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau)

averaged over all ``2N`` anchors, where ``sim`` is the cosine similarity. BatchNorm statistics
are those of the global batch as well, because the step runs under ``jax.jit`` over arrays
sharded on the mesh.

Config keys: ``config.simclr.{temperature, proj_hidden_dim, proj_out_dim, proj_layers, proj_bn}``,
``config.aug.{view1, view2}`` (see ``ssl_jax.data.augment.view_config``), ``config.model``.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ssl_jax.config import require
from ssl_jax.data import augment
from ssl_jax.methods.base import MethodBase
from ssl_jax.models import create_encoder
from ssl_jax.models.heads import ProjectionMLP
from ssl_jax.parallel import BATCH_AXES


def nt_xent_local(z1: jax.Array, z2: jax.Array, temperature: float, axes: Any = None) -> tuple:
    """NT-Xent summed over this shard's anchors, negatives from the whole global batch.

    Args:
      z1, z2: ``[local_batch, dim]`` projections of the two views of the same images.
      temperature: tau in eq. (1).
      axes: mesh axes the batch is split over (inside ``shard_map``), or None on one shard.

    Returns:
      ``(loss_sum, correct_sum)``: the summed loss of the ``2 * local_batch`` anchors, and how many
      of them rank their positive first among all ``2N - 1`` candidates.
    """
    chex.assert_equal_shape((z1, z2))
    local = z1.shape[0]
    z = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    a1, a2 = z[:local], z[local:]
    if axes is None:
        shard, g1, g2 = 0, a1, a2
    else:
        shard = jax.lax.axis_index(axes)
        g1 = jax.lax.all_gather(a1, axes, tiled=True)
        g2 = jax.lax.all_gather(a2, axes, tiled=True)
    total = g1.shape[0]
    candidates = jnp.concatenate([g1, g2], axis=0)  # [2N, dim]
    anchors = jnp.concatenate([a1, a2], axis=0)  # [2 * local, dim]
    logits = anchors @ candidates.T / temperature  # [2 * local, 2N]
    rows = jnp.arange(local) + shard * local
    self_index = jnp.concatenate([rows, rows + total])
    positive = jnp.concatenate([rows + total, rows])
    logits = jnp.where(
        jnp.arange(2 * total)[None, :] == self_index[:, None], -jnp.inf, logits
    )
    log_prob = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.take_along_axis(log_prob, positive[:, None], axis=-1)[:, 0]
    correct = jnp.argmax(logits, axis=-1) == positive
    return loss.sum(), correct.sum()


def nt_xent(
    z1: jax.Array, z2: jax.Array, temperature: float, mesh: Mesh | None = None
) -> tuple[jax.Array, jax.Array]:
    """Mean NT-Xent over the global batch and the contrastive top-1 accuracy.

    ``z1, z2``: ``[global_batch, dim]``, sharded over the mesh's batch axes when ``mesh`` is given
    (each device computes the rows of its own anchors against the all-gathered batch).
    """
    count = 2 * z1.shape[0]
    if mesh is None:
        loss_sum, correct = nt_xent_local(z1, z2, temperature)
    else:

        def per_shard(a, b):
            loss_sum, correct = nt_xent_local(a, b, temperature, BATCH_AXES)
            return jax.lax.psum(loss_sum, BATCH_AXES), jax.lax.psum(correct, BATCH_AXES)

        loss_sum, correct = jax.shard_map(
            per_shard, mesh=mesh, in_specs=(P(BATCH_AXES), P(BATCH_AXES)), out_specs=(P(), P())
        )(z1, z2)
    return loss_sum / count, correct / count


class SimCLR(MethodBase):
    """Encoder + projection head trained with NT-Xent over two views."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None):
        cfg = config.simclr
        require(cfg.temperature > 0, "simclr.temperature", "must be > 0")
        require(cfg.proj_layers >= 1, "simclr.proj_layers", "must be >= 1")
        self.config = config
        self.mesh = mesh
        self.views = (config.aug.view1, config.aug.view2)
        model = dict(config.model)
        self.encoder = create_encoder(model.pop("name"), image_size=config.aug.view1.size, **model)
        self.head = ProjectionMLP(
            hidden_dim=cfg.proj_hidden_dim,
            out_dim=cfg.proj_out_dim,
            num_layers=cfg.proj_layers,
            use_bn=cfg.proj_bn,
            dtype=self.encoder.dtype,
        )

    def augment(self, rng: jax.Array, images: jax.Array) -> jax.Array:
        """``[batch, h, w, 3]`` uint8 -> ``[2 * batch, size, size, 3]`` normalised, with the two
        views of image i at rows 2i and 2i+1 so that both stay on the device that holds image i."""
        k1, k2 = jax.random.split(rng)
        v1 = augment.augment_view(k1, images, self.views[0])
        v2 = augment.augment_view(k2, images, self.views[1])
        x = jnp.stack([v1, v2], axis=1)
        return augment.normalize(x.reshape(-1, *x.shape[2:]))

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        k_enc, k_head, k_aug = jax.random.split(rng, 3)
        x = self.augment(k_aug, batch["image"])
        enc_vars = self.encoder.init({"params": k_enc, "dropout": k_enc}, x, train=False)
        feats = self.encoder.apply(enc_vars, x, train=False)
        head_vars = self.head.init(k_head, feats, train=False)
        params = {"encoder": enc_vars["params"], "head": head_vars["params"]}
        extra = {
            "encoder": {k: v for k, v in enc_vars.items() if k != "params"},
            "head": {k: v for k, v in head_vars.items() if k != "params"},
        }
        return params, extra

    def loss(self, params, extra, batch, rng, step):
        del step
        k_aug, k_drop = jax.random.split(rng)
        x = self.augment(k_aug, batch["image"])
        feats, enc_state = self.encoder.apply(
            {"params": params["encoder"], **extra["encoder"]}, x, train=True,
            mutable=list(extra["encoder"]), rngs={"dropout": k_drop},
        )
        z, head_state = self.head.apply(
            {"params": params["head"], **extra["head"]}, feats, train=True,
            mutable=list(extra["head"]),
        )
        z = z.reshape(-1, 2, z.shape[-1])
        loss, accuracy = nt_xent(z[:, 0], z[:, 1], self.config.simclr.temperature, self.mesh)
        metrics = {"contrastive_acc": accuracy, "feature_std": _feature_std(feats)}
        return loss, (metrics, {"encoder": dict(enc_state), "head": dict(head_state)})

    def after_update(self, params, extra, step):
        del params, step
        return extra

    def encoder_variables(self, params, extra) -> dict[str, Any]:
        return {"params": params["encoder"], **extra["encoder"]}


def _feature_std(feats: jax.Array) -> jax.Array:
    """Mean per-dimension std of L2-normalised features: near 0 signals collapse."""
    f = feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
    return jnp.std(f, axis=0).mean()


def simclr_config(**overrides: Any) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        dict(temperature=0.1, proj_hidden_dim=2048, proj_out_dim=128, proj_layers=3, proj_bn=True)
    )
    cfg.update(overrides)
    return cfg


def create(config: ml_collections.ConfigDict, mesh: Mesh | None, **run_length: int) -> SimCLR:
    del run_length  # SimCLR has no schedule of its own.
    return SimCLR(config, mesh)

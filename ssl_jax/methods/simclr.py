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

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from ssl_jax.config import require
from ssl_jax.data import augment
from ssl_jax.methods.base import MethodBase
from ssl_jax.methods.ssl_math import apply_network, feature_std, nt_xent, split_variables
from ssl_jax.models.heads import ProjectionMLP


class SimCLR(MethodBase):
    """Encoder + projection head trained with NT-Xent over two views."""

    CONFIG_KEYS = ("temperature", "proj_hidden_dim", "proj_out_dim", "proj_layers", "proj_bn")

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None, **run_length: int):
        super().__init__(config, mesh, **run_length)
        cfg = self.cfg
        require(cfg.temperature > 0, "simclr.temperature", "must be > 0")
        require(cfg.proj_layers >= 1, "simclr.proj_layers", "must be >= 1")
        self.views = (config.aug.view1, config.aug.view2)
        self.head = ProjectionMLP(
            hidden_dim=cfg.proj_hidden_dim,
            out_dim=cfg.proj_out_dim,
            num_layers=cfg.proj_layers,
            use_bn=cfg.proj_bn,
            dtype=self.encoder.dtype,
        )

    def augment(self, rng: jax.Array, images: jax.Array, image_hw: jax.Array | None = None
                ) -> jax.Array:
        """``[batch, h, w, 3]`` uint8 -> ``[2 * batch, size, size, 3]`` normalised, with the two
        views of image i at rows 2i and 2i+1 so that both stay on the device that holds image i."""
        k1, k2 = jax.random.split(rng)
        v1 = augment.augment_view(k1, images, self.views[0], image_hw)
        v2 = augment.augment_view(k2, images, self.views[1], image_hw)
        x = jnp.stack([v1, v2], axis=1)
        return augment.normalize(x.reshape(-1, *x.shape[2:]))

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        k_enc, k_head, k_aug = jax.random.split(rng, 3)
        x = self.augment(k_aug, batch["image"])
        enc_params, enc_state = split_variables(
            self.encoder.init({"params": k_enc, "dropout": k_enc}, x, train=False))
        feats, _ = apply_network(self.encoder, enc_params, enc_state, x, train=False)
        head_params, head_state = split_variables(self.head.init(k_head, feats, train=False))
        return ({"encoder": enc_params, "head": head_params},
                {"encoder": enc_state, "head": head_state})

    def loss(self, params, extra, batch, rng, step):
        del step
        k_aug, k_drop = jax.random.split(rng)
        x = self.augment(k_aug, batch["image"], batch.get("image_hw"))
        feats, enc_state = apply_network(self.encoder, params["encoder"], extra["encoder"], x,
                                         train=True, rng=k_drop)
        z, head_state = apply_network(self.head, params["head"], extra["head"], feats, train=True)
        z = z.reshape(-1, 2, z.shape[-1])
        loss, accuracy = nt_xent(z[:, 0], z[:, 1], self.cfg.temperature, self.mesh)
        metrics = {"contrastive_acc": accuracy, "feature_std": feature_std(feats)}
        return loss, (metrics, {"encoder": enc_state, "head": head_state})


METHOD = SimCLR

r"""Inpainting: the context encoder (Pathak et al. 2016, "Context Encoders: Feature Learning by
Inpainting"), with the reconstruction loss only.

A region of each image (one random crop, flipped at random) is removed: the central square of
side ``hole_size`` (``mask_kind='center'``) or the union of ``num_blocks`` squares of side
``block_size`` at random places, drawn per example on the device (``mask_kind='blocks'``, the
paper's random-block variant). The removed pixels are set to 0 in the normalised image (the
dataset's mean colour, as the paper fills the hole with the mean pixel), so the encoder never
sees them. An encoder-decoder reconstructs the image: the encoder's spatial map (a ResNet's last
stage or a ViT's patch tokens), the paper's channel-wise fully connected layer and an upsampling
convolutional decoder (:class:`~ssl_jax.models.heads.UpsamplingDecoder`). The loss is the
weighted L2 of eq. (1) on the normalised pixels::

    L = sum_{pixels} w * mean_c (F(x_masked) - x)^2 / sum_{pixels} w

with ``w = 1`` in the hole, ``w = overlap_weight`` (the paper: 10) in the ring of ``overlap``
pixels around it (the region the paper's decoder also predicts; those pixels are visible to the
encoder; its released code: 4 px at 128 px) and 0 elsewhere. With ``overlap = 0`` the loss
depends only on the hole. The adversarial term of eq. (3) is left out: it needs a discriminator
and an alternating update that the single-loss step does not have, and the paper's features
(Table 2) were learnt with the reconstruction loss alone as well.

Evaluation and fine-tuning feed the encoder whole images (the default ``encoder_input``). The
evaluation job's picture (:meth:`Inpainting.picture_panels`): masked (hole grey) | filled (the
prediction in the hole, the image elsewhere) | original.

Config keys: ``config.inpainting.{mask_kind, hole_size, overlap, overlap_weight, num_blocks,
block_size, decoder_dim, channel_fc}``; ``config.aug.view1`` is the crop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from ssl_jax.config import require
from ssl_jax.data import augment
from ssl_jax.methods.base import MethodBase
from ssl_jax.methods.ssl_math import feature_map, init_dense
from ssl_jax.models.heads import UpsamplingDecoder

MASK_KINDS = ("center", "blocks")


def center_hole(batch: int, size: int, hole: int) -> jax.Array:
    """``[batch, size, size]`` bool: the central ``hole x hole`` square (top-left at
    ``(size - hole) // 2``)."""
    start = (size - hole) // 2
    r = jnp.arange(size)
    inside = (r >= start) & (r < start + hole)
    return jnp.broadcast_to(inside[:, None] & inside[None, :], (batch, size, size))


def random_blocks(rng: jax.Array, batch: int, size: int, num_blocks: int, block: int
                  ) -> jax.Array:
    """``[batch, size, size]`` bool: per example (its own key, ``split(rng, batch)[i]``) the
    union of ``num_blocks`` squares of side ``block`` with uniform top-left corners."""
    def one(key):
        corners = jax.random.randint(key, (num_blocks, 2), 0, size - block + 1)
        r = jnp.arange(size)
        rows = (r[None, :] >= corners[:, :1]) & (r[None, :] < corners[:, :1] + block)
        cols = (r[None, :] >= corners[:, 1:]) & (r[None, :] < corners[:, 1:] + block)
        return jnp.any(rows[:, :, None] & cols[:, None, :], axis=0)

    return jax.vmap(one)(jax.random.split(rng, batch))


def loss_weights(hole: jax.Array, overlap: int, overlap_weight: float) -> jax.Array:
    """``[batch, size, size]`` float32: 1 in the hole, ``overlap_weight`` on the pixels within
    ``overlap`` (Chebyshev distance) of it that are not in it, 0 elsewhere."""
    hole = hole.astype(jnp.float32)
    if overlap <= 0:
        return hole
    k = 2 * overlap + 1
    near = jax.lax.reduce_window(hole, 0.0, jax.lax.max, (1, k, k), (1, 1, 1), "SAME")
    return hole + overlap_weight * (near - hole)


def inpainting_loss(pred: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum w * mean_c (pred - target)^2 / sum w`` over the global batch; ``pred, target
    [b, s, s, c]``, ``weights [b, s, s]``."""
    per_pixel = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
    return jnp.sum(weights * per_pixel) / jnp.maximum(jnp.sum(weights), 1e-12)


def masked_input(images: jax.Array, hole: jax.Array) -> jax.Array:
    """Normalised ``images [b, s, s, c]`` with the hole's pixels set to 0 (the mean colour)."""
    return jnp.where(hole[..., None], 0.0, images)


class Inpainting(MethodBase):
    """Encoder on the image with a hole, a decoder predicting the pixels, L2 on the hole."""

    CONFIG_KEYS = ("mask_kind", "hole_size", "overlap", "overlap_weight", "num_blocks",
                   "block_size", "decoder_dim", "channel_fc")

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None, **run_length: int):
        super().__init__(config, mesh, **run_length)
        _check_config(config)
        self.view = config.aug.view1
        cfg = self.cfg
        self.decoder = UpsamplingDecoder(out_dim=3, size=self.view.size,
                                         hidden_dim=cfg.decoder_dim, channel_fc=cfg.channel_fc,
                                         dtype=self.encoder.dtype)

    def holes(self, rng: jax.Array, batch: int) -> jax.Array:
        """``[batch, s, s]`` bool: the pixels removed from each view."""
        cfg, size = self.cfg, self.view.size
        if cfg.mask_kind == "center":
            return center_hole(batch, size, cfg.hole_size)
        return random_blocks(rng, batch, size, cfg.num_blocks, cfg.block_size)

    def reconstruct(self, params, state, images, hole, train: bool, rng=None):
        """``(prediction [b, s, s, 3], encoder state)`` of normalised ``images`` whose ``hole``
        is removed before the encoder sees them."""
        fmap, state = feature_map(self.encoder, params["encoder"], state,
                                  masked_input(images, hole), train=train, rng=rng)
        return self.decoder.apply({"params": params["decoder"]}, fmap), state

    def init(self, rng, batch):
        n = batch["image"].shape[0]
        x = jnp.zeros((n, self.view.size, self.view.size, 3), jnp.float32)
        params, state, decoder = init_dense(self.encoder, self.decoder, rng, x)
        return {"encoder": params, "decoder": decoder}, {"encoder": state}

    def loss(self, params, extra, batch, rng, step):
        del step
        k_aug, k_hole, k_drop = jax.random.split(rng, 3)
        images = self.augment(k_aug, batch["image"], batch.get("image_hw"))
        hole = self.holes(k_hole, images.shape[0])
        pred, state = self.reconstruct(params, extra["encoder"], images, hole, True, k_drop)
        weights = loss_weights(hole, self.cfg.overlap, self.cfg.overlap_weight)
        loss = inpainting_loss(pred, images, weights)
        visible = 1.0 - jnp.minimum(weights, 1.0)  # not trained: is the decoder copying?
        metrics = {"hole_fraction": jnp.mean(hole),
                   "hole_mse": inpainting_loss(pred, images, hole.astype(jnp.float32)),
                   "context_mse": inpainting_loss(pred, images, visible)}
        return loss, (metrics, {**extra, "encoder": state})

    def picture_panels(self, params, extra, images, rng) -> dict[str, jax.Array]:
        """Columns of the evaluation job's picture, ``[b, s, s, 3]`` in [0, 1]: the masked
        input (hole grey), the image filled with the prediction in the hole, the original."""
        hole = self.holes(rng, images.shape[0])
        pred, _ = self.reconstruct(params, extra["encoder"], images, hole, False)
        h = hole[..., None]
        original = augment.denormalize(images)
        return {"masked": jnp.where(h, 0.5, original),
                "filled": jnp.where(h, augment.denormalize(pred), original),
                "original": original}


METHOD = Inpainting


def _check_config(config: ml_collections.ConfigDict) -> None:
    """Every key that could fail later, as a ConfigError naming it, before compiling."""
    cfg, size = config.inpainting, config.aug.view1.size
    require(cfg.mask_kind in MASK_KINDS, "inpainting.mask_kind",
            f"{cfg.mask_kind!r} is unknown; use one of {MASK_KINDS}")
    require(cfg.overlap >= 0, "inpainting.overlap", "must be >= 0 pixels (0: the hole only)")
    require(cfg.overlap_weight >= 0, "inpainting.overlap_weight", "must be >= 0 (paper: 10)")
    require(cfg.decoder_dim >= 1, "inpainting.decoder_dim", "must be >= 1")
    if cfg.mask_kind == "center":
        require(1 <= cfg.hole_size and cfg.hole_size + 2 * cfg.overlap <= size,
                "inpainting.hole_size",
                f"{cfg.hole_size} px plus the {cfg.overlap}-px overlap on each side must fit in "
                f"the {size}-px view (aug.view1.size): use a hole of at most "
                f"{size - 2 * cfg.overlap} px, or a larger view")
        require(cfg.hole_size + 2 * cfg.overlap < size or cfg.overlap == 0,
                "inpainting.overlap", "the hole and its overlap would leave no context")
        require(cfg.hole_size < size, "inpainting.hole_size",
                f"{cfg.hole_size} px removes the whole {size}-px view (aug.view1.size): the "
                "encoder would see nothing")
    else:
        require(1 <= cfg.block_size < size, "inpainting.block_size",
                f"{cfg.block_size} px must be at least 1 and smaller than the {size}-px view "
                "(aug.view1.size)")
        require(cfg.num_blocks >= 1, "inpainting.num_blocks", "must be >= 1")

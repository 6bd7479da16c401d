"""SimMIM (Xie et al. 2022, "SimMIM: A Simple Framework for Masked Image Modeling").

An image (one random resized crop, flipped at random: SimMIM's augmentation) is cut into mask
patches larger than the model's patches (32 px over 16-px patches at 224 px); a share
``mask_ratio`` of them (60%, ``ceil(ratio * M)`` of the ``M`` mask patches) is masked at random
(``ssl_jax.data.masking.mask_patch_mask``), each masking the model patches it covers. Unlike MAE,
every token goes through the encoder: the embeddings of masked patches are replaced by a learned
mask token at the encoder's input (``ViT(use_mask_token=True)``). A one-layer linear head
(SimMIM's 1x1 convolution with pixel shuffle: one Dense per patch token) predicts the raw pixels
(of the normalised image) of every patch, and the loss is the L1 distance on the pixels of
masked patches only, normalised by their number::

    L = sum_{i,j,c} m_i |y_ijc - x_ijc| / (sum_{i,j} m_i + 1e-5) / 3

(``i`` a patch, ``j`` a pixel of it, ``c`` a channel, ``m_i = 1`` for masked patches; the
``1e-5`` and the division by the 3 channels are SimMIM's ``F.l1_loss`` normalisation). The sums
run over the global batch. Pixel layout of a patch: row-major, channels last (``patchify``), a
permutation of SimMIM's pixel-shuffle order that a learned linear head absorbs.

Evaluation uses the encoder alone on all patches, no mask; its pictures are MAE's: original,
masked input, reconstruction (visible patches pasted back).

Config keys: ``config.simmim.{mask_patch_size, mask_ratio}``; ``config.aug.view1`` is the crop.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from ssl_jax.config import require
from ssl_jax.data import masking
from ssl_jax.methods.base import MethodBase
from ssl_jax.methods.ssl_math import patchify, reconstruction_panels
from ssl_jax.models.layers import Dense
from ssl_jax.models.vit import ViT

L1_EPS = 1e-5  # SimMIM's (mask.sum() + 1e-5)


def simmim_loss(pred: jax.Array, target: jax.Array, mask: jax.Array
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SimMIM's L1 loss on the pixels of masked patches.

    ``pred, target [batch, N, p*p*c]`` (c = 3), ``mask [batch, N]`` (1 = masked). Metrics: the
    same mean absolute error on visible patches (not trained) and the share of patches masked."""
    chex.assert_equal_shape([pred, target])
    chex.assert_shape(mask, pred.shape[:2])
    pixels_per_patch = pred.shape[-1] // 3
    mask = mask.astype(jnp.float32)
    per_patch = jnp.sum(jnp.abs(pred.astype(jnp.float32) - target), axis=-1)  # [batch, N]
    loss = jnp.sum(per_patch * mask) / (jnp.sum(mask) * pixels_per_patch + L1_EPS) / 3
    visible = 1.0 - mask
    visible_l1 = jnp.sum(per_patch * visible) / jnp.maximum(jnp.sum(visible), 1.0) / pred.shape[-1]
    return loss, {"visible_pixel_l1": visible_l1, "mask_ratio": jnp.mean(mask)}


class SimMIM(MethodBase):
    """ViT with mask tokens on all patches + a linear head, trained to regress masked pixels."""

    CONFIG_KEYS = ("mask_patch_size", "mask_ratio")

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None, **run_length: int):
        super().__init__(config, mesh, **run_length)
        self.view = config.aug.view1
        _check_config(config, self.encoder)
        self.patch = self.encoder.patch_size
        self.grid = (self.view.size // self.patch,) * 2
        # SimMIM's decoder keeps PyTorch's default Conv2d init: U(+-1/sqrt(fan_in)).
        self.head = Dense(self.patch * self.patch * 3, dtype=self.encoder.dtype, name="head",
                          kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"))

    def masks(self, rng: jax.Array, batch: int) -> jax.Array:
        """``[batch, N]`` bool (True = masked) at the mask-patch scale, on the model's grid."""
        cfg = self.cfg
        return masking.mask_patch_mask(rng, batch, self.view.size, cfg.mask_patch_size,
                                       self.patch, cfg.mask_ratio)

    def predict(self, params, images, mask, train: bool, rng=None) -> jax.Array:
        """Normalised ``images [batch, s, s, 3]`` with ``mask`` patches hidden -> predicted pixels
        of every patch ``[batch, N, p*p*3]`` float32."""
        rngs = {"dropout": rng} if train else {}
        tokens = self.encoder.apply({"params": params["encoder"]}, images, train=train,
                                    return_tokens=True, bool_masked_pos=mask, rngs=rngs)
        patches = tokens[:, self.encoder.num_prefix_tokens:]
        return self.head.apply({"params": params["head"]}, patches).astype(jnp.float32)

    # --- The Method interface ----------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        k_enc, k_head = jax.random.split(rng)
        n = batch["image"].shape[0]
        x = jnp.zeros((n, self.view.size, self.view.size, 3), jnp.float32)  # shapes only
        mask = jnp.zeros((n, self.grid[0] * self.grid[1]), bool)
        enc = self.encoder.init({"params": k_enc, "dropout": k_enc}, x, train=False,
                                bool_masked_pos=mask)
        tokens = self.encoder.apply(enc, x, train=False, return_tokens=True)
        head = self.head.init(k_head, tokens[:, self.encoder.num_prefix_tokens:])
        return {"encoder": enc["params"], "head": head["params"]}, {}

    def loss(self, params, extra, batch, rng, step):
        del step
        k_aug, k_mask, k_drop = jax.random.split(rng, 3)
        images = self.augment(k_aug, batch["image"], batch.get("image_hw"))
        mask = self.masks(k_mask, images.shape[0])
        pred = self.predict(params, images, mask, True, k_drop)
        loss, metrics = simmim_loss(pred, patchify(images, self.patch), mask)
        return loss, (metrics, extra)

    def picture_panels(self, params, extra, images: jax.Array, rng: jax.Array
                       ) -> dict[str, jax.Array]:
        """Columns of the evaluation job's reconstruction picture (as MAE's): the image, the
        masked input, the prediction with the visible patches pasted back. ``images``:
        normalised evaluation views."""
        mask = self.masks(rng, images.shape[0])
        pred = self.predict(params, images, mask, False)
        return reconstruction_panels(patchify(images, self.patch), pred, mask, self.patch,
                                     self.grid)


METHOD = SimMIM


def _check_config(config, encoder) -> None:
    """Every SimMIM key that could fail later, as a ConfigError naming it, before compile (the
    model patches tiling ``aug.view1`` are checked with the encoder)."""
    cfg = config.simmim
    require(isinstance(encoder, ViT), "model.name",
            f"SimMIM needs a ViT (patch tokens and a mask token); {config.model.name!r} is not one")
    require(encoder.use_mask_token, "model.use_mask_token",
            "SimMIM replaces masked patch embeddings by the mask token: set it to True")
    size, patch, mask_patch = config.aug.view1.size, encoder.patch_size, cfg.mask_patch_size
    require(isinstance(mask_patch, int) and mask_patch > 0 and mask_patch % patch == 0,
            "simmim.mask_patch_size", f"{mask_patch} must be a positive multiple of the model's "
            f"patch size {patch} (SimMIM: 32 px over 16-px patches)")
    require(size % mask_patch == 0, "simmim.mask_patch_size",
            f"mask patches of {mask_patch} px do not tile the {size}-px view (aug.view1.size); "
            f"use a divisor of {size} that is a multiple of {patch}")
    require(0.0 < cfg.mask_ratio < 1.0, "simmim.mask_ratio",
            f"{cfg.mask_ratio} must be in (0, 1) (SimMIM: 0.6)")

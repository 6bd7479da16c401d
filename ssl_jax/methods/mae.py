"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

An image (one random resized crop, flipped at random: MAE's minimal augmentation) is cut into
``N`` patches; per example a share ``mask_ratio`` of them (75%) is masked (``ssl_jax.data.masking``:
``random`` by the argsort of uniform noise as in the paper, or ``block`` / ``grid`` as in its
ablation). The ViT encoder sees only the visible patches, no mask tokens. A light decoder
(:class:`ssl_jax.models.heads.MAEDecoder`) gets the encoded visible tokens plus a shared mask
token at every masked position, with fixed 2-D sin-cos position embeddings, and predicts every
patch's pixels linearly. The loss is the mean squared error on the **masked** patches only::

    L = sum_i m_i * mean_j (pred_ij - target_ij)^2 / sum_i m_i

where ``m_i = 1`` for masked patches and the target is the patch's pixels (of the normalised
image), normalised per patch (``norm_pix_loss``: ``(x - mean) / sqrt(var + 1e-6)``).

Pixel layout of a patch (``patch_dim = p * p * 3``): row-major over the patch, channels last
(MAE's ``patchify``). Evaluation uses the encoder alone on all patches (cls token pooled).

Config keys: ``config.mae.{mask_ratio, mask_kind, block_min_patches, norm_pix_loss,
decoder_dim, decoder_depth, decoder_heads}``; ``config.aug.view1`` is the crop.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from ssl_jax.config import require
from ssl_jax.data import augment, masking
from ssl_jax.methods.base import MethodBase
from ssl_jax.models import create_encoder
from ssl_jax.models.heads import MAEDecoder
from ssl_jax.models.vit import ViT

NORM_PIX_EPS = 1e-6


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """``[batch, h, w, c] -> [batch, (h/p) * (w/p), p * p * c]``, patches row-major."""
    chex.assert_rank(images, 4)
    batch, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not divisible by patch size {patch}")
    x = images.reshape(batch, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, grid: tuple[int, int], channels: int = 3
               ) -> jax.Array:
    """Inverse of :func:`patchify`: ``[batch, rows * cols, p * p * c] -> [batch, h, w, c]``."""
    chex.assert_rank(patches, 3)
    batch = patches.shape[0]
    rows, cols = grid
    x = patches.reshape(batch, rows, cols, patch, patch, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows * patch, cols * patch, channels)


def patch_targets(patches: jax.Array, norm_pix: bool) -> jax.Array:
    """The regression target: the pixels, normalised per patch when ``norm_pix``."""
    if not norm_pix:
        return patches
    mean = jnp.mean(patches, axis=-1, keepdims=True)
    var = jnp.var(patches, axis=-1, keepdims=True, ddof=1)  # torch's unbiased .var()
    return (patches - mean) / jnp.sqrt(var + NORM_PIX_EPS)


def mae_loss(pred: jax.Array, target: jax.Array, mask: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over masked patches of the per-patch mean squared error.

    ``pred, target [batch, N, D]``, ``mask [batch, N]`` (1 = masked). Metrics: the same error on
    the visible patches (not trained; a sanity check that the decoder does not copy)."""
    chex.assert_equal_shape([pred, target])
    chex.assert_shape(mask, pred.shape[:2])
    per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
    loss = jnp.sum(per_patch * mask) / jnp.sum(mask)
    visible = 1.0 - mask
    visible_loss = jnp.sum(per_patch * visible) / jnp.maximum(jnp.sum(visible), 1.0)
    return loss, {"visible_patch_loss": visible_loss, "mask_ratio": jnp.mean(mask)}


class MAE(MethodBase):
    """ViT encoder on visible patches + light decoder, trained to reconstruct masked patches."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None):
        self.config = config
        self.mesh = mesh
        model = dict(config.model)
        model_name = model.pop("name")
        self.view = config.aug.view1
        self.encoder = create_encoder(model_name, image_size=self.view.size, **model)
        _check_config(config, self.encoder, model_name)
        cfg = config.mae
        self.patch = self.encoder.patch_size
        self.grid = (self.view.size // self.patch,) * 2
        self.decoder = MAEDecoder(
            grid=self.grid, patch_dim=self.patch * self.patch * 3, dim=cfg.decoder_dim,
            depth=cfg.decoder_depth, num_heads=cfg.decoder_heads,
            dtype=self.encoder.dtype)

    def masks(self, rng: jax.Array, batch: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.config.mae
        return masking.shuffle_mask(rng, batch, self.grid, cfg.mask_ratio, cfg.mask_kind,
                                    cfg.block_min_patches)

    def reconstruct(self, params, images, ids_keep, ids_restore, train: bool, rng=None):
        """Normalised ``images [batch, s, s, 3]`` -> predicted patches ``[batch, N, D]``."""
        rngs = {"dropout": rng} if train else {}
        tokens = self.encoder.apply({"params": params["encoder"]}, images, train=train,
                                    return_tokens=True, ids_keep=ids_keep, rngs=rngs)
        return self.decoder.apply({"params": params["decoder"]}, tokens, ids_restore)

    # --- The Method interface ----------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        k_enc, k_dec, k_mask = jax.random.split(rng, 3)
        n = batch["image"].shape[0]
        x = jnp.zeros((n, self.view.size, self.view.size, 3), jnp.float32)  # shapes only
        ids_keep, _, ids_restore = self.masks(k_mask, n)
        enc = self.encoder.init({"params": k_enc, "dropout": k_enc}, x, train=False)
        tokens = self.encoder.apply(enc, x, train=False, return_tokens=True, ids_keep=ids_keep)
        dec = self.decoder.init(k_dec, tokens, ids_restore)
        return {"encoder": enc["params"], "decoder": dec["params"]}, {}

    def augment(self, rng: jax.Array, images: jax.Array) -> jax.Array:
        """uint8 ``[batch, h, w, 3]`` -> the normalised view ``config.aug.view1``."""
        return augment.normalize(augment.augment_view(rng, images, self.view))

    def loss(self, params, extra, batch, rng, step):
        del step
        k_aug, k_mask, k_drop = jax.random.split(rng, 3)
        images = self.augment(k_aug, batch["image"])
        ids_keep, mask, ids_restore = self.masks(k_mask, images.shape[0])
        pred = self.reconstruct(params, images, ids_keep, ids_restore, True, k_drop)
        target = patch_targets(patchify(images, self.patch), self.config.mae.norm_pix_loss)
        loss, metrics = mae_loss(pred, target, mask)
        return loss, (metrics, extra)

    def after_update(self, params, extra, step):
        return extra

    def encoder_variables(self, params, extra) -> dict[str, Any]:
        return {"params": params["encoder"]}

    def picture_panels(self, params, extra, images: jax.Array, rng: jax.Array
                       ) -> dict[str, jax.Array]:
        """Columns of the evaluation job's reconstruction picture, ``[batch, s, s, 3]`` in
        [0, 1]: the image, the masked input (masked patches grey), the reconstruction with the
        visible patches pasted back. ``images``: normalised evaluation views."""
        ids_keep, mask, ids_restore = self.masks(rng, images.shape[0])
        pred = self.reconstruct(params, images, ids_keep, ids_restore, False)
        patches = patchify(images, self.patch)
        if self.config.mae.norm_pix_loss:  # predictions are per-patch normalised: undo with
            mean = jnp.mean(patches, axis=-1, keepdims=True)  # the true patch's statistics
            std = jnp.sqrt(jnp.var(patches, axis=-1, keepdims=True, ddof=1) + NORM_PIX_EPS)
            pred = pred * std + mean
        m = mask[:, :, None]
        to_image = lambda p: augment.denormalize(unpatchify(p, self.patch, self.grid))
        return {
            "original": to_image(patches),
            "masked": jnp.where(unpatchify(jnp.broadcast_to(m, patches.shape), self.patch,
                                           self.grid) > 0, 0.5, to_image(patches)),
            "reconstruction": to_image(m * pred + (1 - m) * patches),
        }


def _check_config(config, encoder, model_name: str) -> None:
    """Every MAE key that could fail later, as a ConfigError naming it, before compile."""
    cfg = config.mae
    require(isinstance(encoder, ViT), "model.name",
            f"MAE needs a ViT encoder (token dropping); {model_name!r} is not one")
    size, patch = config.aug.view1.size, encoder.patch_size
    require(size % patch == 0, "aug.view1.size",
            f"image size {size} px is not divisible by the patch size {patch} of {model_name}; "
            f"use a multiple of {patch}")
    require(cfg.mask_kind in masking.MASK_KINDS, "mae.mask_kind",
            f"{cfg.mask_kind!r} is unknown; use one of {masking.MASK_KINDS}")
    require(0.0 < cfg.mask_ratio < 1.0, "mae.mask_ratio",
            f"{cfg.mask_ratio} must be in (0, 1) (MAE: 0.75)")
    n = (size // patch) ** 2
    keep = int(n * (1 - cfg.mask_ratio))
    require(0 < keep < n, "mae.mask_ratio",
            f"{cfg.mask_ratio} of {n} patches leaves {keep} visible; at least one must be "
            "visible and one masked")
    require(cfg.decoder_depth >= 1, "mae.decoder_depth", "must be >= 1")
    require(cfg.decoder_dim % cfg.decoder_heads == 0 and cfg.decoder_dim % 4 == 0,
            "mae.decoder_dim", f"{cfg.decoder_dim} must be divisible by 4 (sin-cos position "
            f"embeddings) and by mae.decoder_heads={cfg.decoder_heads}")
    if cfg.mask_kind == "block":
        require(1 <= cfg.block_min_patches <= n - keep, "mae.block_min_patches",
                f"{cfg.block_min_patches} must be in [1, {n - keep}] (the masked patches)")


def mae_config(**overrides: Any) -> ml_collections.ConfigDict:
    """MAE's ImageNet defaults (ViT-B/16 pre-training recipe)."""
    cfg = ml_collections.ConfigDict(dict(
        mask_ratio=0.75, mask_kind="random", block_min_patches=16, norm_pix_loss=True,
        decoder_dim=512, decoder_depth=8, decoder_heads=16))
    cfg.update(overrides)
    return cfg


def create(config: ml_collections.ConfigDict, mesh: Mesh | None, **run_length: int) -> MAE:
    del run_length  # MAE has no schedule of its own
    return MAE(config, mesh)

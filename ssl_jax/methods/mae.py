"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

An image (one random resized crop, flipped at random: MAE's minimal augmentation) is cut into
``N`` patches; per example a share ``mask_ratio`` of them (75%) is masked (``ssl_jax.data.masking``:
``random`` by the argsort of uniform noise as in the paper, or ``block`` / ``grid`` as in its
ablation). The ViT encoder sees only the visible patches, no mask tokens. A light decoder
(:class:`MAEDecoder`, below) gets the encoded visible tokens plus a shared mask
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
from ssl_jax.models.vit import LN_EPSILON, EncoderBlock, ViT
from ssl_jax.models.vit_init import dense_init
from ssl_jax.models.vit_position import sincos_2d_pos_embed

NORM_PIX_EPS = 1e-6


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


class MAEDecoder(nn.Module):
    """MAE's light decoder (He et al. 2022, Sec. 3): predicts the pixels of every patch.

    The encoded visible tokens are projected to the decoder width; a shared learnable mask
    token fills every masked position; ``ids_restore`` puts the ``[visible; masked]`` sequence
    back in patch order; fixed 2-D sin-cos position embeddings (zero for the cls token) are
    added; ``depth`` pre-norm transformer blocks, a LayerNorm and a linear layer give
    ``patch_dim = patch * patch * channels`` values per patch.

    ``__call__(tokens [batch, 1 + n_keep, enc_dim] (cls first), ids_restore [batch, N])`` ->
    ``[batch, N, patch_dim]`` float32 in patch order (the cls token's output is dropped).
    """

    grid: tuple[int, int]
    patch_dim: int
    dim: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, ids_restore: jnp.ndarray) -> jnp.ndarray:
        chex.assert_rank([tokens, ids_restore], [3, 2])
        batch, num_patches = ids_restore.shape
        chex.assert_equal(num_patches, self.grid[0] * self.grid[1])
        x = Dense(self.dim, dtype=self.dtype, kernel_init=dense_init("mae"),
                     name="embed")(tokens.astype(self.dtype))
        cls, visible = x[:, :1], x[:, 1:]
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.dim))
        fill = jnp.broadcast_to(mask_token.astype(x.dtype),
                                (batch, num_patches - visible.shape[1], self.dim))
        x = jnp.concatenate([visible, fill], axis=1)
        x = jnp.take_along_axis(x, ids_restore[:, :, None], axis=1)  # back in patch order
        x = x + jnp.asarray(sincos_2d_pos_embed(self.dim, self.grid))[None].astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1)  # the cls token's position embedding is 0
        for i in range(self.depth):
            x = EncoderBlock(self.dim, self.num_heads, self.mlp_ratio, drop_path=0.0,
                             layer_scale_init=None, dtype=self.dtype, name=f"block{i}")(x, False)
        x = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, name="norm")(x)
        x = Dense(self.patch_dim, dtype=self.dtype, kernel_init=dense_init("mae"),
                     name="pred")(x[:, 1:])
        x = x.astype(jnp.float32)
        chex.assert_shape(x, (batch, num_patches, self.patch_dim))
        return x


class MAE(MethodBase):
    """ViT encoder on visible patches + light decoder, trained to reconstruct masked patches."""

    CONFIG_KEYS = ("mask_ratio", "mask_kind", "block_min_patches", "norm_pix_loss",
                   "decoder_dim", "decoder_depth", "decoder_heads")

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None, **run_length: int):
        super().__init__(config, mesh, **run_length)
        self.view = config.aug.view1
        _check_config(config, self.encoder)
        cfg = self.cfg
        self.patch = self.encoder.patch_size
        self.grid = (self.view.size // self.patch,) * 2
        self.decoder = MAEDecoder(
            grid=self.grid, patch_dim=self.patch * self.patch * 3, dim=cfg.decoder_dim,
            depth=cfg.decoder_depth, num_heads=cfg.decoder_heads,
            dtype=self.encoder.dtype)

    def masks(self, rng: jax.Array, batch: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
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

    def loss(self, params, extra, batch, rng, step):
        del step
        k_aug, k_mask, k_drop = jax.random.split(rng, 3)
        images = self.augment(k_aug, batch["image"], batch.get("image_hw"))
        ids_keep, mask, ids_restore = self.masks(k_mask, images.shape[0])
        pred = self.reconstruct(params, images, ids_keep, ids_restore, True, k_drop)
        target = patch_targets(patchify(images, self.patch), self.cfg.norm_pix_loss)
        loss, metrics = mae_loss(pred, target, mask)
        return loss, (metrics, extra)

    def picture_panels(self, params, extra, images: jax.Array, rng: jax.Array
                       ) -> dict[str, jax.Array]:
        """Columns of the evaluation job's reconstruction picture, ``[batch, s, s, 3]`` in
        [0, 1]: the image, the masked input (masked patches grey), the reconstruction with the
        visible patches pasted back. ``images``: normalised evaluation views."""
        ids_keep, mask, ids_restore = self.masks(rng, images.shape[0])
        pred = self.reconstruct(params, images, ids_keep, ids_restore, False)
        patches = patchify(images, self.patch)
        if self.cfg.norm_pix_loss:  # predictions are per-patch normalised: undo with
            mean = jnp.mean(patches, axis=-1, keepdims=True)  # the true patch's statistics
            std = jnp.sqrt(jnp.var(patches, axis=-1, keepdims=True, ddof=1) + NORM_PIX_EPS)
            pred = pred * std + mean
        return reconstruction_panels(patches, pred, mask, self.patch, self.grid)


METHOD = MAE


def _check_config(config, encoder) -> None:
    """Every MAE key that could fail later, as a ConfigError naming it, before compile (the
    patch grid is checked with the encoder)."""
    cfg = config.mae
    require(isinstance(encoder, ViT), "model.name",
            f"MAE needs a ViT encoder (token dropping); {config.model.name!r} is not one")
    size, patch = config.aug.view1.size, encoder.patch_size
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

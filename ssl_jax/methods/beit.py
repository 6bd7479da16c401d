"""BEiT (Bao et al. 2022, "BERT Pre-Training of Image Transformers"): masked image modelling
with visual tokens.

Each image gives two views of one random crop (BEiT's augmentation: random resized crop, flip and
colour jitter, shared): the ViT's view (``aug.view1.size``, e.g. 224 px at patch 16: a 14x14
grid) and the tokenizer's view (its own input size, e.g. 112 px, 8x down-sampled: 14x14 tokens).
A dVAE tokenizer trained by this project (``configs/dvae.py``, ``ssl_jax.methods.dvae``) turns the
tokenizer's view into targets ``z_i = argmax_v q(v | x)_i``, one of V visual tokens per patch. It is
frozen: its parameters travel in the method's ``extra`` state (restored once from its workdir, saved
with every BEiT checkpoint), never in ``params``, so they get no gradient and no optimizer state.

About 40% of the patches are masked with BEiT's blockwise sampler (``data.masking.block_mask``:
blocks of at least ``min_block_patches`` patches, aspect ratio in [0.3, 1/0.3]); their patch
embeddings are replaced by a learned mask token (``ViT(use_mask_token=True)``). The ViT (relative
position bias shared by the blocks, layer scale 0.1, no absolute position embedding) encodes all
tokens, and a linear head predicts the visual token at every masked position. The loss is the
softmax cross-entropy over the V tokens at masked positions only (BEiT Eq. 1)::

    L = - sum_i m_i log p(z_i | x^M)_i / sum_i m_i,   m_i = 1 for masked patches.

Config keys: ``config.beit.{tokenizer_workdir, vocab_size, mask_ratio, min_block_patches,
min_aspect}``; ``config.aug.view1`` is the ViT's view (its colour jitter applies to both views).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from ssl_jax import methods
from ssl_jax.config import ConfigError, require
from ssl_jax.data import augment, masking
from ssl_jax.methods.base import MethodBase
from ssl_jax.models.layers import Dense
from ssl_jax.models.vit import ViT
from ssl_jax.models.vit_init import token_init


def paired_views(key: jax.Array, images: jax.Array, view: Any, tokenizer_size: int,
                 image_hw: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The same random crop (same flip, same colour jitter) at two sizes, drawn within
    ``image_hw`` (``[batch, 2]``, the content of padded canvases) when given.

    ``images [batch, h, w, 3]`` uint8 or [0, 1] -> ``([batch, view.size, view.size, 3],
    [batch, tokenizer_size, tokenizer_size, 3])`` float32 in [0, 1]."""
    x = augment.to_float_image(images)
    if image_hw is None:
        image_hw = jnp.broadcast_to(jnp.asarray(x.shape[1:3], jnp.int32), (x.shape[0], 2))
    brightness, contrast, saturation, hue = augment.jitter_values(view)

    def one(k, image, hw):
        k_crop, k_flip, k_jitter = jax.random.split(k, 3)
        box = augment.crop_box(k_crop, hw[0], hw[1], view.crop_scale, view.crop_ratio)
        pair = []
        for size in (view.size, tokenizer_size):
            y = augment.resized_crop(image, box, size)
            if view.flip:
                y = augment.random_flip(k_flip, y)
            if view.color_jitter > 0 and view.color_jitter_p > 0:  # same key: same factors
                y = augment.color_jitter(k_jitter, y, p=view.color_jitter_p,
                                         brightness=brightness, contrast=contrast,
                                         saturation=saturation, hue=hue)
            pair.append(y)
        return tuple(pair)

    return jax.vmap(one)(jax.random.split(key, x.shape[0]), x, image_hw)


def masked_token_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy of ``logits [batch, N, V]`` against token ids ``targets [batch, N]`` averaged
    over the masked positions (``mask [batch, N]``, 1 = masked) only; metrics: the accuracy of the
    predicted token at masked positions and the share of patches masked."""
    chex.assert_shape(targets, logits.shape[:2])
    chex.assert_equal_shape([targets, mask])
    mask = mask.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    loss = jnp.sum(ce * mask) / count
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return loss, {"masked_token_accuracy": jnp.sum(correct * mask) / count,
                  "mask_ratio": jnp.mean(mask)}


def load_tokenizer_run(workdir: str, mesh: Mesh | None) -> tuple[Any, ml_collections.ConfigDict]:
    """``(tokenizer method, its run config)`` of the dVAE run in ``workdir``."""
    # A run of another method: the one reach to the right, imported late (ssl_jax.restore sits
    # above the method layer; it only reads the tokenizer run, never through a
    # CheckpointManager).
    from ssl_jax import restore

    try:
        tok_config = restore.load_run_config(workdir)
    except restore.WorkdirError as e:
        raise ConfigError(f"config.beit.tokenizer_workdir: {e}") from None
    require(tok_config.method == "dvae", "beit.tokenizer_workdir",
            f"{workdir} holds a {tok_config.method!r} run, not a dVAE tokenizer; train one with "
            f"python -m ssl_jax.train --config configs/dvae.py:data=... --workdir TOK")
    return methods.create(tok_config, mesh), tok_config


class BEiT(MethodBase):
    """ViT with mask tokens, trained to predict a frozen dVAE's visual tokens of masked patches."""

    CONFIG_KEYS = ("tokenizer_workdir", "vocab_size", "mask_ratio", "min_block_patches",
                   "min_aspect")

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None, **run_length: int):
        super().__init__(config, mesh, **run_length)
        cfg = self.cfg
        require(bool(cfg.tokenizer_workdir), "beit.tokenizer_workdir",
                "BEiT needs a trained dVAE tokenizer: train one with python -m ssl_jax.train "
                "--config configs/dvae.py:data=DATA --workdir TOK, then pass "
                "--config.beit.tokenizer_workdir=TOK")
        self.tokenizer, self.tokenizer_config = load_tokenizer_run(cfg.tokenizer_workdir, mesh)
        self.view = config.aug.view1
        self.grid = _check_config(config, self.encoder, self.tokenizer)
        self.num_masked = int(self.grid[0] * self.grid[1] * cfg.mask_ratio)
        self.head = Dense(cfg.vocab_size, dtype=self.encoder.dtype, name="head",
                          kernel_init=token_init(self.encoder.init_scheme))
        self.tokenizer_params = self.restore_tokenizer()

    def restore_tokenizer(self) -> Any:
        """The tokenizer's trained parameters from its latest good checkpoint (host arrays; read
        here, outside any trace, so that ``init`` can return them under jit)."""
        from ssl_jax import restore  # read-only, see load_tokenizer_run

        _, state, _ = restore.restore_state(
            self.cfg.tokenizer_workdir, self.tokenizer_config, self.mesh)
        return jax.device_get(state["params"])

    def masks(self, rng: jax.Array, batch: int) -> jax.Array:
        """BEiT's blockwise masks ``[batch, N]`` bool (True = masked)."""
        cfg = self.cfg
        sample = functools.partial(masking.block_mask, grid=self.grid, num_masked=self.num_masked,
                                   min_block=cfg.min_block_patches, min_aspect=cfg.min_aspect)
        return jax.vmap(sample)(jax.random.split(rng, batch)).reshape(batch, -1)

    def targets(self, extra: Any, tokenizer_view: jax.Array) -> jax.Array:
        """Visual tokens ``[batch, N]`` of normalised tokenizer views (no gradient)."""
        frozen = jax.lax.stop_gradient(extra["tokenizer"])
        return jax.lax.stop_gradient(self.tokenizer.token_ids(frozen, tokenizer_view))

    def predict(self, params, images, mask, train: bool, rng=None) -> jax.Array:
        """Token logits ``[batch, N, V]`` for normalised ``images`` with ``mask`` patches hidden."""
        rngs = {"dropout": rng} if train else {}
        tokens = self.encoder.apply({"params": params["encoder"]}, images, train=train,
                                    return_tokens=True, bool_masked_pos=mask, rngs=rngs)
        patches = tokens[:, self.encoder.num_prefix_tokens:]
        return self.head.apply({"params": params["head"]}, patches)

    # --- The Method interface ----------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        k_enc, k_head = jax.random.split(rng)
        n = batch["image"].shape[0]
        x = jnp.zeros((n, self.view.size, self.view.size, 3), jnp.float32)
        mask = jnp.zeros((n, self.grid[0] * self.grid[1]), bool)
        enc = self.encoder.init({"params": k_enc, "dropout": k_enc}, x, train=False,
                                bool_masked_pos=mask)
        tokens = self.encoder.apply(enc, x, train=False, return_tokens=True)
        head = self.head.init(k_head, tokens[:, self.encoder.num_prefix_tokens:])
        return ({"encoder": enc["params"], "head": head["params"]},
                {"tokenizer": self.tokenizer_params})

    def augment(self, rng: jax.Array, images: jax.Array, image_hw: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
        """uint8 images -> normalised ``(view for the ViT, the same crop for the tokenizer)``."""
        view, tok_view = paired_views(rng, images, self.view, self.tokenizer.image_size,
                                      image_hw)
        return augment.normalize(view), augment.normalize(tok_view)

    def loss(self, params, extra, batch, rng, step):
        del step
        k_aug, k_mask, k_drop = jax.random.split(rng, 3)
        images, tok_images = self.augment(k_aug, batch["image"], batch.get("image_hw"))
        mask = self.masks(k_mask, images.shape[0])
        targets = self.targets(extra, tok_images)
        logits = self.predict(params, images, mask, True, k_drop)
        loss, metrics = masked_token_loss(logits, targets, mask)
        return loss, (metrics, extra)

    def picture_panels(self, params, extra, images: jax.Array, rng: jax.Array
                       ) -> dict[str, jax.Array]:
        """Columns of the evaluation job's picture, ``[batch, s, s, 3]`` in [0, 1]: the image,
        the masked input (masked patches grey), the tokenizer's decoding of the image's own
        tokens, and its decoding of BEiT's predicted tokens at the masked patches (true tokens
        elsewhere). ``images``: normalised evaluation views."""
        batch, size = images.shape[0], self.tokenizer.image_size
        tok_images = jax.image.resize(images, (batch, size, size, 3), "bilinear")
        mask = self.masks(rng, batch)
        targets = self.targets(extra, tok_images)
        predicted = jnp.where(mask, jnp.argmax(self.predict(params, images, mask, False), -1),
                              targets)
        decode = lambda ids: augment.denormalize(
            self.tokenizer.decode_tokens(extra["tokenizer"], ids))
        pixel_mask = jnp.repeat(jnp.repeat(mask.reshape(batch, *self.grid), self.encoder.patch_size,
                                           axis=1), self.encoder.patch_size, axis=2)
        original = augment.denormalize(images)
        return {"original": original,
                "masked": jnp.where(pixel_mask[..., None], 0.5, original),
                "tokenizer": decode(targets),
                "prediction": decode(predicted)}


METHOD = BEiT


def _check_config(config, encoder, tokenizer) -> tuple[int, int]:
    """Every BEiT key that could fail later, as a ConfigError naming it; returns the grid (the
    patches tiling ``aug.view1`` are checked with the encoder)."""
    cfg = config.beit
    require(isinstance(encoder, ViT) and encoder.use_mask_token, "model.use_mask_token",
            f"BEiT needs a ViT with a mask token; {config.model.name!r} with use_mask_token="
            f"{getattr(encoder, 'use_mask_token', None)} is not one")
    size, patch = config.aug.view1.size, encoder.patch_size
    grid = (size // patch, size // patch)
    tok_grid = (tokenizer.grid, tokenizer.grid)
    require(tok_grid == grid, "beit.tokenizer_workdir",
            f"the tokenizer gives a {tok_grid[0]}x{tok_grid[1]} token grid but the ViT sees a "
            f"{grid[0]}x{grid[1]} patch grid ({size} px at patch {patch}); train a tokenizer whose "
            f"input size / 2**num_downsample is {grid[0]}, or change aug.view1.size")
    require(cfg.vocab_size == tokenizer.vocab_size, "beit.vocab_size",
            f"{cfg.vocab_size} does not match the tokenizer's vocabulary of "
            f"{tokenizer.vocab_size} tokens; set --config.beit.vocab_size={tokenizer.vocab_size}")
    n = grid[0] * grid[1]
    require(0.0 < cfg.mask_ratio < 1.0, "beit.mask_ratio",
            f"{cfg.mask_ratio} must be in (0, 1) (BEiT: about 0.4)")
    num_masked = int(n * cfg.mask_ratio)
    require(0.0 < cfg.min_aspect <= 1.0, "beit.min_aspect", f"{cfg.min_aspect} must be in (0, 1]")
    require(1 <= cfg.min_block_patches <= num_masked, "beit.min_block_patches",
            f"blocks of at least {cfg.min_block_patches} patches cannot reach mask_ratio="
            f"{cfg.mask_ratio} ({num_masked} of {n} patches): the block sampler never accepts a "
            f"block larger than the patches left to mask; lower beit.min_block_patches to at most "
            f"{num_masked} or raise the ratio")
    side = round(math.sqrt(cfg.min_block_patches))
    require(side < min(grid), "beit.min_block_patches",
            f"a block of {cfg.min_block_patches} patches (about {side}x{side}) does not fit in the "
            f"{grid[0]}x{grid[1]} grid (blocks must be smaller than the grid); lower it")
    return grid

"""Vision Transformer encoders (Dosovitskiy et al., 2021).

Pre-norm transformer blocks over patch tokens:

    z_0 = [cls; x_1 E; ...; x_N E] + E_pos
    z'_l = z_{l-1} + DropPath(LS(MSA(LN(z_{l-1}))))
    z_l  = z'_l + DropPath(LS(MLP(LN(z'_l))))
    output = LN(z_L)

The pieces are separate methods (`embed`, `position_embeddings`, `prepend_cls`, `input_tokens`,
`encode`, `pool`) so that methods needing a different token flow (token dropping, mask tokens,
the last blocks' outputs) can call them in another order with `module.apply(..., method=...)`.

Position embeddings describe the patch grid of `image_size`; an input with another grid gets
them resampled bicubically (the cls position embedding is kept apart), so one ViT serves 224-px
global crops and 96-px local crops alike.

BEiT's options: `pos_embed='none'` with `rel_pos_bias=True` (one relative position bias table
shared by all blocks, BEiT's pre-training setting), `use_mask_token=True` (masked patch
embeddings replaced by a learned token: `__call__(..., bool_masked_pos=...)`) and
`layer_scale_init`.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.models.layers import Dense, PatchEmbed, attention, attention_weights, gelu
from ssl_jax.models.vit_init import (
    check_init_scheme,
    dense_init,
    patch_bias_uniform,
    patch_init,
    token_init,
)
from ssl_jax.models.vit_position import RelativePositionBias, resize_pos_embed, sincos_2d_pos_embed

VIT_SIZES: dict[str, tuple[int, int, int]] = {  # (dim, depth, heads)
    "ti": (192, 12, 3), "s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16),
    "h": (1280, 32, 16)}
POS_EMBED_KINDS = ("learned", "sincos", "none")
POOL_KINDS = ("cls", "mean")
LN_EPSILON = 1e-6


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): drop a whole residual branch per example.

    Kept branches are scaled by 1 / (1 - rate) so the expectation is unchanged. Uses the
    'dropout' rng. `[batch, ...] -> [batch, ...]`.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT): `x * gamma`, gamma = init."""

    init_value: float

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
        return x * gamma.astype(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    softmax(q k^T / sqrt(head_dim) + bias) v per head. `x [batch, tokens, dim]`, optional
    `bias` broadcastable to `[batch, heads, tokens, tokens]` -> `[batch, tokens, dim]`.
    """

    dim: int
    num_heads: int
    dtype: Any = jnp.float32
    init_scheme: str = "mae"  # see models/vit_init.py
    layer_id: int = 1  # 1-based block index (BEiT's scheme scales `proj` by it)

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, bias: jnp.ndarray | None = None, return_weights: bool = False
    ) -> jnp.ndarray:
        """With ``return_weights``: the attention probabilities ``[batch, heads, tokens,
        tokens]`` (float32, rows sum to 1) instead of the output.

        Written out rather than ``jax.nn.dot_product_attention`` (same result to float rounding,
        faster on CPU): q, k, v are split (whose gradient is a concatenation, not three padded
        copies) and laid out ``[batch, heads, tokens, head_dim]`` once, so that both batched
        matmuls run on contiguous blocks; q is scaled before ``q k^T``."""
        batch, tokens, _ = x.shape
        head_dim = self.dim // self.num_heads
        qkv = Dense(3 * self.dim, dtype=self.dtype, kernel_init=dense_init(self.init_scheme),
                    name="qkv")(x)
        q, k, v = (t.reshape(batch, tokens, self.num_heads, head_dim).transpose(0, 2, 1, 3)
                   for t in jnp.split(qkv, 3, axis=-1))
        q = q * jnp.asarray(head_dim**-0.5, q.dtype)
        if return_weights:
            return attention_weights(q, k, bias)
        out = attention(q, k, v, bias).reshape(batch, tokens, self.dim)
        return Dense(self.dim, dtype=self.dtype,
                     kernel_init=dense_init(self.init_scheme, self.layer_id), name="proj")(out)


class Mlp(nn.Module):
    """Dense -> GELU (exact erf form) -> Dense. `[..., dim] -> [..., dim]`."""

    hidden_dim: int
    dtype: Any = jnp.float32
    init_scheme: str = "mae"
    layer_id: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dim = x.shape[-1]
        init = self.init_scheme
        x = Dense(self.hidden_dim, dtype=self.dtype, kernel_init=dense_init(init), name="fc1")(x)
        x = gelu(x)
        return Dense(dim, dtype=self.dtype, kernel_init=dense_init(init, self.layer_id),
                     name="fc2")(x)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block. `[batch, tokens, dim] -> [batch, tokens, dim]`."""

    dim: int
    num_heads: int
    mlp_ratio: float
    drop_path: float
    layer_scale_init: float | None
    dtype: Any = jnp.float32
    init_scheme: str = "mae"
    layer_id: int = 1

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        train: bool,
        attn_bias: jnp.ndarray | None = None,
        return_attention: bool = False,
    ) -> jnp.ndarray:
        """``return_attention``: this block's attention weights ``[batch, heads, t, t]``."""
        y = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, name="norm1")(x)
        attention = Attention(self.dim, self.num_heads, self.dtype, self.init_scheme, self.layer_id,
                              name="attn")
        if return_attention:
            return attention(y, attn_bias, return_weights=True)
        y = attention(y, attn_bias)
        if self.layer_scale_init is not None:
            y = LayerScale(self.layer_scale_init, name="ls1")(y)
        x = x + DropPath(self.drop_path, name="drop_path1")(y, deterministic=not train)

        y = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, name="norm2")(x)
        y = Mlp(int(self.dim * self.mlp_ratio), self.dtype, self.init_scheme, self.layer_id,
                name="mlp")(y)
        if self.layer_scale_init is not None:
            y = LayerScale(self.layer_scale_init, name="ls2")(y)
        return x + DropPath(self.drop_path, name="drop_path2")(y, deterministic=not train)


class ViT(nn.Module):
    """Vision Transformer backbone without classifier.

    `__call__(x [batch, height, width, channels], train)` -> `[batch, dim]` (float32): the cls
    token after the final LayerNorm, or the mean of the patch tokens when `use_cls_token` is
    False. With `return_tokens=True`: `[batch, num_prefix_tokens + num_patches, dim]`, all
    tokens after the final LayerNorm (before it with `final_norm=False`). With `ids_keep
    [batch, n_keep]` (MAE's token dropping), only those patches (after their position
    embeddings are added) enter the blocks, and
    `num_patches` above is `n_keep`. With `return_attention=True`: the last block's attention
    probabilities `[batch, num_heads, tokens, tokens]` (softmax(q k^T / sqrt(d)), float32), for
    attention maps; the row of token 0 is the cls token's attention. Height and width must be
    multiples of `patch_size`.

    Attributes:
      patch_size: side of the square patches (convolution with kernel = stride = patch).
      dim, depth, num_heads: token width, number of blocks, attention heads.
      mlp_ratio: MLP hidden width / dim.
      image_size: input side the position-embedding grid is built for.
      pos_embed: 'learned' (trunc-normal 0.02 parameter), 'sincos' (fixed MAE 2-D sin-cos,
        not a parameter; the cls token gets no position embedding) or 'none' (BEiT, with
        `rel_pos_bias`).
      use_cls_token: prepend a learned cls token.
      pool_type: features of `__call__`: 'cls' (the cls token) or 'mean' (the mean of the patch
        tokens, BEiT's and MAE's choice for fine-tuning; always, without a cls token).
      rel_pos_bias: one relative position bias shared by all blocks (BEiT); inputs must have
        the grid of `image_size` and all their patches (no `ids_keep`).
      use_mask_token: a learned token that replaces the embeddings of masked patches.
      drop_path_rate: stochastic depth of the last block, rising linearly from 0 at the first;
        active only with train=True, using the 'dropout' rng.
      layer_scale_init: initial LayerScale gamma; None for no LayerScale.
      dtype: compute dtype (parameters stay float32).
      init_scheme: initial weights as in 'mae' (default), 'dino' or 'beit': models/vit_init.py.
    """

    patch_size: int
    dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    image_size: int = 224
    pos_embed: str = "learned"
    use_cls_token: bool = True
    pool_type: str = "cls"
    rel_pos_bias: bool = False
    use_mask_token: bool = False
    drop_path_rate: float = 0.0
    layer_scale_init: float | None = None
    dtype: Any = jnp.float32
    init_scheme: str = "mae"

    @property
    def num_features(self) -> int:
        """Size of the pooled output features, known without initialising."""
        return self.dim

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: 1 with a cls token, else 0."""
        return int(self.use_cls_token)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid `(rows, cols)` of an `image_size` input."""
        side = self.image_size // self.patch_size
        return side, side

    def _check_config(self) -> None:
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(
                f"ViT image_size={self.image_size} must be a positive multiple of "
                f"patch_size={self.patch_size}; change one of them."
            )
        if self.dim % self.num_heads:
            raise ValueError(f"ViT dim={self.dim} must be divisible by num_heads={self.num_heads}.")
        if self.pos_embed not in POS_EMBED_KINDS:
            raise ValueError(
                f"ViT pos_embed={self.pos_embed!r} is unknown; use one of {POS_EMBED_KINDS}."
            )
        if self.pos_embed == "sincos" and self.dim % 4:
            raise ValueError(f"ViT pos_embed='sincos' needs dim divisible by 4, got {self.dim}.")
        if self.pool_type not in POOL_KINDS:
            raise ValueError(f"ViT pool_type={self.pool_type!r} is unknown; use one of "
                             f"{POOL_KINDS}.")
        check_init_scheme(self.init_scheme)
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"ViT drop_path_rate={self.drop_path_rate} must be in [0, 1).")

    def setup(self) -> None:
        self._check_config()
        patch = (self.patch_size, self.patch_size)
        self.patch_embed = PatchEmbed(self.dim, patch, strides=patch, padding="VALID",
                                      dtype=self.dtype, kernel_init=patch_init(self.init_scheme),
                                      torch_bias=patch_bias_uniform(self.init_scheme))
        tokens = token_init(self.init_scheme)
        if self.use_cls_token:
            self.cls_token = self.param("cls_token", tokens, (1, 1, self.dim))
        if self.pos_embed == "learned":
            num_tokens = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
            self.pos_embedding = self.param("pos_embedding", tokens, (1, num_tokens, self.dim))
        if self.use_mask_token:
            self.mask_token = self.param("mask_token", tokens, (1, 1, self.dim))
        if self.rel_pos_bias:
            self.rel_pos = RelativePositionBias(self.grid_size, self.num_heads,
                                                self.num_prefix_tokens)
        rates = np.linspace(0.0, self.drop_path_rate, self.depth) if self.depth else []
        self.blocks = [
            EncoderBlock(dim=self.dim, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                         drop_path=float(rate), layer_scale_init=self.layer_scale_init,
                         dtype=self.dtype, init_scheme=self.init_scheme, layer_id=layer + 1)
            for layer, rate in enumerate(rates)
        ]
        self.norm = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype)

    def embed(self, images: jnp.ndarray) -> tuple[jnp.ndarray, tuple[int, int]]:
        """Patch tokens, no position: `[batch, h, w, c] -> ([batch, h/p * w/p, dim], grid)`."""
        chex.assert_rank(images, 4)
        batch, height, width, _ = images.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"ViT input of {height}x{width} pixels is not divisible by patch_size={p}; "
                f"resize or crop images to a multiple of {p} (image_size={self.image_size})."
            )
        tokens = self.patch_embed(images.astype(self.dtype))
        grid = (height // p, width // p)
        return tokens.reshape(batch, grid[0] * grid[1], self.dim), grid

    def position_embeddings(
        self, grid: tuple[int, int]
    ) -> tuple[jnp.ndarray | None, jnp.ndarray | None]:
        """Position embeddings for a patch grid.

        Returns `(prefix [1, num_prefix_tokens, dim] or None, patches [1, rows * cols, dim])`,
        float32; the patch part is resampled bicubically when `grid != self.grid_size`.
        `(None, None)` for `pos_embed='none'`.
        """
        if self.pos_embed == "none":
            return None, None
        if self.pos_embed == "sincos":
            prefix = None
            patches = jnp.asarray(sincos_2d_pos_embed(self.dim, self.grid_size))[None]
        else:
            n = self.num_prefix_tokens
            prefix = self.pos_embedding[:, :n] if n else None
            patches = self.pos_embedding[:, n:]
        if tuple(grid) != self.grid_size:
            patches = resize_pos_embed(patches, self.grid_size, tuple(grid))
        return prefix, patches

    def prepend_cls(self, tokens: jnp.ndarray, prefix_pos: jnp.ndarray | None) -> jnp.ndarray:
        """Prepend the cls token (plus its position embedding), if the model has one.

        `[batch, n, dim] -> [batch, num_prefix_tokens + n, dim]`.
        """
        if not self.use_cls_token:
            return tokens
        cls = self.cls_token
        if prefix_pos is not None:
            cls = cls + prefix_pos
        cls = jnp.broadcast_to(cls.astype(tokens.dtype), (tokens.shape[0], 1, self.dim))
        return jnp.concatenate([cls, tokens], axis=1)

    def attention_bias(self, grid: tuple[int, int], num_patches: int) -> jnp.ndarray | None:
        """The shared relative position bias ``[1, heads, t, t]``, or None without one."""
        if not self.rel_pos_bias:
            return None
        if tuple(grid) != self.grid_size or num_patches != grid[0] * grid[1]:
            raise ValueError(
                f"ViT rel_pos_bias is defined for the {self.grid_size} patch grid of "
                f"image_size={self.image_size} with all patches; got a {grid} grid with "
                f"{num_patches} patches (other input sizes and token dropping need a ViT without "
                "rel_pos_bias).")
        return self.rel_pos()

    def input_tokens(self, x: jnp.ndarray, ids_keep: jnp.ndarray | None = None,
                     bool_masked_pos: jnp.ndarray | None = None
                     ) -> tuple[jnp.ndarray, jnp.ndarray | None, int]:
        """The tokens that enter the first block (see `__call__`), the attention bias, and
        the number of patch tokens among them."""
        tokens, grid = self.embed(x)
        batch = x.shape[0]
        if bool_masked_pos is not None:  # BEiT: masked patches become the mask token
            if not self.use_mask_token:
                raise ValueError("ViT bool_masked_pos needs use_mask_token=True.")
            chex.assert_shape(bool_masked_pos, (batch, grid[0] * grid[1]))
            w = bool_masked_pos.astype(tokens.dtype)[:, :, None]
            tokens = tokens * (1 - w) + self.mask_token.astype(tokens.dtype) * w
        prefix_pos, patch_pos = self.position_embeddings(grid)
        if patch_pos is not None:
            tokens = tokens + patch_pos.astype(tokens.dtype)
        num_patches = grid[0] * grid[1]
        if ids_keep is not None:  # MAE: only the visible patches enter the encoder
            chex.assert_shape(ids_keep, (batch, None))
            tokens = jnp.take_along_axis(tokens, ids_keep[:, :, None], axis=1)
            num_patches = ids_keep.shape[1]
        tokens = self.prepend_cls(tokens, prefix_pos)
        return tokens, self.attention_bias(grid, num_patches), num_patches

    def encode(self, tokens: jnp.ndarray, train: bool, bias: jnp.ndarray | None = None,
               final_norm: bool = True) -> jnp.ndarray:
        """Transformer blocks then the final LayerNorm. `[batch, t, dim] -> [batch, t, dim]`."""
        for block in self.blocks:
            tokens = block(tokens, train, bias)
        return self.norm(tokens) if final_norm else tokens

    def pool(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """`[batch, t, dim] -> [batch, dim]`: the cls token, or the mean of the patch tokens."""
        if self.pool_type == "cls" and self.use_cls_token:
            return tokens[:, 0]
        return jnp.mean(tokens[:, self.num_prefix_tokens:], axis=1)

    def last_attention(self, tokens: jnp.ndarray, train: bool, bias: jnp.ndarray | None = None
                       ) -> jnp.ndarray:
        """The last block's attention weights ``[batch, heads, t, t]`` for input tokens
        ``[batch, t, dim]`` (the blocks before it run as in :meth:`encode`)."""
        if not self.blocks:
            raise ValueError("ViT with depth=0 has no attention to return.")
        for block in self.blocks[:-1]:
            tokens = block(tokens, train, bias)
        return self.blocks[-1](tokens, train, bias, return_attention=True)

    def __call__(
        self,
        x: jnp.ndarray,
        train: bool,
        *,
        return_tokens: bool = False,
        return_attention: bool = False,
        ids_keep: jnp.ndarray | None = None,
        bool_masked_pos: jnp.ndarray | None = None,
        final_norm: bool = True,
    ) -> jnp.ndarray:
        batch = x.shape[0]
        tokens, bias, num_patches = self.input_tokens(x, ids_keep, bool_masked_pos)
        if return_attention:
            weights = self.last_attention(tokens, train, bias)
            t = self.num_prefix_tokens + num_patches
            chex.assert_shape(weights, (batch, self.num_heads, t, t))
            return weights
        tokens = self.encode(tokens, train, bias, final_norm).astype(jnp.float32)
        if return_tokens:
            chex.assert_shape(tokens, (batch, self.num_prefix_tokens + num_patches, self.dim))
            return tokens
        features = self.pool(tokens)
        chex.assert_shape(features, (batch, self.dim))
        return features


def vit(size: str, patch_size: int, **kw: Any) -> ViT:
    """ViT of a standard size ('ti', 's', 'b', 'l', 'h'); `kw` sets (or overrides) fields."""
    if size not in VIT_SIZES:
        raise ValueError(f"ViT size={size!r} is unknown; use one of {list(VIT_SIZES)}.")
    dim, depth, num_heads = VIT_SIZES[size]
    return ViT(patch_size=patch_size, **{"dim": dim, "depth": depth, "num_heads": num_heads, **kw})

"""A ViT's position information: MAE's fixed 2-D sin-cos table, the bicubic resampling of a
learned table to another patch grid, and BEiT's relative position bias."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def sincos_2d_pos_embed(dim: int, grid: tuple[int, int]) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding of MAE (`get_2d_sincos_pos_embed`).

    For a 1-D position p and d = dim / 4 frequencies w_k = 10000^(-k / d), k < d:
    e(p) = [sin(p w_0..w_{d-1}), cos(p w_0..w_{d-1})]. The 2-D embedding of the patch in
    row r, column c is [e(c), e(r)] (MAE's ordering: the first half encodes the column).

    Returns `[grid_h * grid_w, dim]` float32, row-major over the grid.
    """
    if dim % 4:
        raise ValueError(f"sincos position embedding needs dim divisible by 4, got dim={dim}.")
    grid_h, grid_w = grid
    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h))
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))

    def embed_1d(pos: np.ndarray) -> np.ndarray:
        angles = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([embed_1d(cols), embed_1d(rows)], axis=1).astype(np.float32)


def resize_pos_embed(
    pos_embed: jnp.ndarray, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> jnp.ndarray:
    """Bicubic resampling of patch position embeddings to another grid.

    `[1, old_h * old_w, dim] -> [1, new_h * new_w, dim]`, half-pixel centres (as torch's
    `interpolate(mode='bicubic', align_corners=False)`), no antialiasing.
    """
    chex.assert_shape(pos_embed, (1, old_grid[0] * old_grid[1], None))
    dim = pos_embed.shape[-1]
    grid = pos_embed.reshape(old_grid[0], old_grid[1], dim).astype(jnp.float32)
    grid = jax.image.resize(grid, (*new_grid, dim), method="bicubic", antialias=False)
    return grid.reshape(1, new_grid[0] * new_grid[1], dim)


def relative_position_index(grid: tuple[int, int], num_prefix: int) -> np.ndarray:
    """BEiT's index into the relative position bias table, ``[t, t]`` int32, ``t = num_prefix +
    rows * cols`` (query row, key column).

    Patches ``i, j`` at ``(r_i, c_i), (r_j, c_j)`` share the entry ``(r_i - r_j + rows - 1) *
    (2 cols - 1) + (c_i - c_j + cols - 1)``; with a cls token three more entries follow:
    cls -> patch, patch -> cls, cls -> cls (table size ``(2 rows - 1)(2 cols - 1) + 3``)."""
    rows, cols = grid
    coords = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]
    patch_index = (rel[0] + rows - 1) * (2 * cols - 1) + (rel[1] + cols - 1)
    if not num_prefix:
        return patch_index.astype(np.int32)
    n = (2 * rows - 1) * (2 * cols - 1)
    index = np.zeros((rows * cols + 1,) * 2, np.int64)
    index[1:, 1:] = patch_index
    index[0, 1:], index[1:, 0], index[0, 0] = n, n + 1, n + 2
    return index.astype(np.int32)


class RelativePositionBias(nn.Module):
    """A learned bias per head and relative offset (BEiT, Sec. 2.5): ``[1, heads, t, t]``.

    The table starts at zero; ``grid`` is fixed (a BEiT ViT sees one input size)."""

    grid: tuple[int, int]
    num_heads: int
    num_prefix: int

    @nn.compact
    def __call__(self) -> jnp.ndarray:
        rows, cols = self.grid
        size = (2 * rows - 1) * (2 * cols - 1) + (3 if self.num_prefix else 0)
        table = self.param("table", nn.initializers.zeros, (size, self.num_heads))
        index = relative_position_index(self.grid, self.num_prefix)
        return jnp.transpose(table[index], (2, 0, 1))[None]

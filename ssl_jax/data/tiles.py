"""Patches cut on a 3x3 grid, on the device: the inputs of the spatial pretext tasks (relative
patch position, Doersch et al. 2015; jigsaw, Noroozi & Favaro 2016), per-patch normalisation and
the chromatic-aberration remedies of Doersch et al.

Per-example functions take ONE image ``[height, width, 3]`` and its own key; methods ``jax.vmap``
them over ``jax.random.split(key, batch)`` as :mod:`ssl_jax.data.augment` does.

The grid: cell ``(r, c)`` (row-major, ``r, c in 0..2``, cell 4 the centre) of a grid with stride
``s`` and slack ``j`` has its top-left corner at ``(r s + dy, c s + dx)`` with ``dy, dx`` drawn
uniformly from ``0..j`` per cell: a patch of side ``p`` needs a square of ``2 s + p + j`` pixels.
Jigsaw's 64-px tiles in 75-px cells are ``s = 75, p = 64, j = 11``; Doersch's 96-px patches with a
48-px gap and a jitter of +-7 px are ``s = 96 + 48, p = 96, j = 14``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

GRID = 3
CENTRE = 4  # the centre cell's index, row-major
# The 8 neighbours of the centre, row-major: label l of relative position is cell NEIGHBOURS[l]
# (Doersch et al.'s numbering 1 2 3 / 4 _ 5 / 6 7 8, from 0).
NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)
# The green-magenta axis of RGB that Doersch et al.'s "projection" removes.
GREEN_MAGENTA = (-1.0, 2.0, -1.0)
STANDARDIZE_EPS = 1e-5


def grid_side(stride: int, patch: int, slack: int) -> int:
    """The side of the square a 3x3 grid of ``patch``-px patches needs (see the module)."""
    return (GRID - 1) * stride + patch + slack


def grid_corners(key: jax.Array, stride: int, slack: int) -> jax.Array:
    """int32 ``[9, 2]``: the (top, left) corner of each cell's patch, row-major, each cell
    shifted by its own ``dy, dx ~ U{0..slack}``."""
    cells = jnp.arange(GRID * GRID)
    base = jnp.stack([cells // GRID, cells % GRID], axis=1) * stride
    shift = jax.random.randint(key, (GRID * GRID, 2), 0, slack + 1)
    return (base + shift).astype(jnp.int32)


def cut_patches(image: jax.Array, corners: jax.Array, size: int) -> jax.Array:
    """``image [h, w, c]``, ``corners [k, 2]`` (top, left) -> ``[k, size, size, c]``. Corners must
    leave the patch inside the image (the grid functions above guarantee it)."""
    chex.assert_rank([image, corners], [3, 2])
    channels = image.shape[-1]

    def one(corner):
        return jax.lax.dynamic_slice(image, (corner[0], corner[1], 0), (size, size, channels))

    return jax.vmap(one)(corners)


def standardize(patches: jax.Array, axes: tuple[int, ...] = (-3, -2, -1)) -> jax.Array:
    """Each patch of ``[..., h, w, c]`` to zero mean and unit standard deviation over ``axes``
    (default: its pixels and channels), so that the mean and contrast of neighbouring patches do
    not give their arrangement away (Noroozi & Favaro, Sec. 3.3). A flat patch stays at zero."""
    mean = jnp.mean(patches, axis=axes, keepdims=True)
    std = jnp.std(patches, axis=axes, keepdims=True)
    return (patches - mean) / (std + STANDARDIZE_EPS)


def project_green_magenta(image: jax.Array) -> jax.Array:
    """Doersch et al.'s "projection": ``x - (x . a) a`` for every pixel, ``a`` the unit
    green-magenta axis ``(-1, 2, -1) / sqrt(6)``; grey pixels are unchanged. ``[..., 3]``."""
    axis = jnp.asarray(GREEN_MAGENTA, image.dtype) / jnp.sqrt(6.0).astype(image.dtype)
    return image - (image @ axis)[..., None] * axis


def drop_colour(key: jax.Array, patch: jax.Array, noise_std: float = 0.01) -> jax.Array:
    """Doersch et al.'s "colour dropping" of one patch ``[h, w, 3]``: one channel drawn at random
    is kept and standardised; the two others become Gaussian noise of ``noise_std`` times its
    standard deviation (the paper: about 1/100)."""
    k_keep, k_noise = jax.random.split(key)
    keep = jax.random.randint(k_keep, (), 0, 3)
    kept = standardize(patch, axes=(-3, -2))
    noise = noise_std * jax.random.normal(k_noise, patch.shape, patch.dtype)
    return jnp.where(jnp.arange(3) == keep, kept, noise)

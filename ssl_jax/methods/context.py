"""Relative patch position, "context prediction" (Doersch et al. 2015, "Unsupervised Visual
Representation Learning by Context Prediction").

A random crop of ``crop_size`` px (``config.aug.view1``'s crop, flip and colour settings,
resized to ``crop_size``) holds a 3x3 grid of ``patch_size``-px patches ``gap`` px apart, placed
at random in the crop, each patch shifted by up to ``jitter`` px in both directions (the paper:
96-px patches, a 48-px gap, +-7 px), so that neither edges nor lines continuing across patches
give their arrangement away. The centre patch and one of its 8 neighbours, ``y`` uniform per
image (row-major: 0 1 2 / 3 _ 4 / 5 6 7), are standardised each on its own and embedded by the
shared encoder f; a head h on the concatenation ``[f(centre), f(neighbour)]`` predicts ``y``::

    L = -1/N sum_i log softmax(h([f(p_centre), f(p_y)]))[y]

Chromatic aberration (colour fringes that move with the distance to the lens centre) lets a
network locate a patch in the photograph without understanding it; ``colour`` picks the paper's
remedies: ``'project'`` removes the green-magenta component of the crop
(:func:`~ssl_jax.data.tiles.project_green_magenta`), ``'drop'`` keeps one random colour channel
per patch and replaces the two others by faint noise (:func:`~ssl_jax.data.tiles.drop_colour`),
``'none'`` keeps the colours (standardisation only). Both remedies act in training only:
evaluation and fine-tuning see the colour image.

Config keys: ``config.context.{crop_size, patch_size, gap, jitter, colour, head_hidden_dim,
head_layers}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from ssl_jax.config import require
from ssl_jax.data import augment, tiles
from ssl_jax.methods.pretext import HEAD_KEYS, PretextClassifier, view_of_size

COLOUR_REMEDIES = ("none", "project", "drop")


class Context(PretextClassifier):
    """The siamese encoder on a centre patch and a neighbour, a head that says which one."""

    CONFIG_KEYS = ("crop_size", "patch_size", "gap", "jitter", "colour", *HEAD_KEYS)
    concat = True  # one label per pair, from [f(centre), f(neighbour)]

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None, **run_length: int):
        super().__init__(config, mesh, **run_length)
        cfg = self.cfg
        for key in ("patch_size", "gap", "jitter"):
            low = 1 if key == "patch_size" else 0
            require(isinstance(cfg[key], int) and cfg[key] >= low, f"context.{key}",
                    f"is {cfg[key]!r}: must be an int >= {low} (pixels)")
        require(2 * cfg.jitter <= cfg.gap, "context.jitter",
                f"{cfg.jitter} px each way would let patches {cfg.gap} px apart (context.gap) "
                f"touch or overlap: use jitter <= gap / 2 (the paper: 7 px and a 48-px gap)")
        require(cfg.colour in COLOUR_REMEDIES, "context.colour",
                f"is {cfg.colour!r}: use one of {COLOUR_REMEDIES}")
        self.stride = cfg.patch_size + cfg.gap
        self.grid_side = tiles.grid_side(self.stride, cfg.patch_size, 2 * cfg.jitter)
        require(self.grid_side <= cfg.crop_size, "context.crop_size",
                f"is {cfg.crop_size}: the 3x3 grid of {cfg.patch_size}-px patches, {cfg.gap} px "
                f"apart with +-{cfg.jitter} px of jitter, does not fit; it needs 3 * patch_size "
                f"+ 2 * gap + 2 * jitter = {self.grid_side} px")
        self.check_input_side(cfg.patch_size, "context.patch_size")
        self.region = view_of_size(config.aug.view1, cfg.crop_size)
        self.make_head(num_classes=len(tiles.NEIGHBOURS))

    def pair(self, key: jax.Array, crop: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One crop ``[c, c, 3]`` in [0, 1] -> ``(the centre patch and neighbour y, standardised,
        [2, p, p, 3]; y [])``."""
        k_origin, k_grid, k_label, k_drop = jax.random.split(key, 4)
        cfg = self.cfg
        origin = jax.random.randint(k_origin, (2,), 0, cfg.crop_size - self.grid_side + 1)
        corners = origin + tiles.grid_corners(k_grid, self.stride, 2 * cfg.jitter)
        label = jax.random.randint(k_label, (), 0, len(tiles.NEIGHBOURS))
        cells = jnp.stack([jnp.int32(tiles.CENTRE), jnp.asarray(tiles.NEIGHBOURS)[label]])
        patches = tiles.cut_patches(crop, corners[cells], cfg.patch_size)
        if cfg.colour == "drop":
            patches = jax.vmap(tiles.drop_colour)(jax.random.split(k_drop, 2), patches)
        else:
            patches = tiles.standardize(patches)
        return patches, label

    def task(self, rng: jax.Array, images: jax.Array, image_hw: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
        """uint8 ``[b, h, w, 3]`` -> ``(pairs [b, 2, p, p, 3], positions [b])``."""
        k_crop, k_pair = jax.random.split(rng)
        crops = augment.augment_view(k_crop, images, self.region, image_hw)
        if self.cfg.colour == "project":
            crops = tiles.project_green_magenta(crops)
        keys = jax.random.split(k_pair, crops.shape[0])
        return jax.vmap(self.pair)(keys, crops)


METHOD = Context

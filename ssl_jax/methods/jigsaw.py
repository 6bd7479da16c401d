"""Jigsaw puzzles (Noroozi & Favaro 2016, "Unsupervised Learning of Visual Representations by
Solving Jigsaw Puzzles").

A random crop of ``crop_size`` px (the paper: 225 of a 256-px image; ``config.aug.view1``'s crop,
flip and colour settings, resized to ``crop_size``) is divided into a 3x3 grid of cells of
``crop_size // 3`` px; a tile of ``tile_size`` px is cut at a random place in each cell (64 of
75 px: a gap between tiles, so that edges do not continue across them) and standardised on its
own (zero mean, unit standard deviation over its pixels: low-level statistics of neighbouring
tiles give nothing away, Sec. 3.3). The 9 tiles are shuffled by permutation ``P_y`` of a fixed
set, ``y`` uniform per image: tile ``t`` of the puzzle is cell ``P_y[t]``. The shared encoder f
embeds each tile (the siamese "context-free network"), a head h on the concatenation predicts
``y``::

    L = -1/N sum_i log softmax(h([f(tile_{P_y[0]}), ..., f(tile_{P_y[8]})]))[y]

The permutation set (Algorithm 1 of the paper, :func:`permutation_set`) is computed once from
``permutation_seed``: a first permutation drawn at random among the 9! = 362,880, then greedily
the permutation with the largest summed Hamming distance to those already chosen (ties to the
first in lexicographic order), among those at least ``min_hamming`` from every chosen one (2,
the smallest distance between two permutations, adds no constraint: the paper's sets).

Config keys: ``config.jigsaw.{crop_size, tile_size, num_permutations, min_hamming,
permutation_seed, head_hidden_dim, head_layers}``.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from ssl_jax.config import ConfigError, require
from ssl_jax.data import augment, tiles
from ssl_jax.methods.pretext import HEAD_KEYS, PretextClassifier, view_of_size

NUM_TILES = tiles.GRID * tiles.GRID
MAX_PERMUTATIONS = math.factorial(NUM_TILES)  # 9! = 362,880


@functools.lru_cache(maxsize=1)
def all_permutations() -> np.ndarray:
    """int8 ``[9!, 9]``, every permutation of 0..8 in lexicographic order."""
    return np.array(list(itertools.permutations(range(NUM_TILES))), np.int8)


@functools.lru_cache(maxsize=8)
def permutation_set(size: int, min_hamming: int, seed: int) -> np.ndarray:
    """int32 ``[size, 9]``: Algorithm 1 of Noroozi & Favaro (maximal summed Hamming distance,
    greedy) restricted to permutations at least ``min_hamming`` from every one chosen before; see
    the module. A ConfigError names the key when ``size`` or ``min_hamming`` cannot be met."""
    require(isinstance(size, int) and 2 <= size <= MAX_PERMUTATIONS, "jigsaw.num_permutations",
            f"is {size!r}: must be in [2, 9! = {MAX_PERMUTATIONS}] (the permutations of 9 tiles)")
    require(isinstance(min_hamming, int) and 2 <= min_hamming <= NUM_TILES, "jigsaw.min_hamming",
            f"is {min_hamming!r}: two permutations of 9 tiles differ in 2 to 9 places (2: no "
            "constraint)")
    candidates = all_permutations()
    columns = np.ascontiguousarray(candidates.T)  # [9, 9!]: one fast comparison per position
    first = int(np.random.default_rng(seed).integers(MAX_PERMUTATIONS))
    summed = np.zeros(MAX_PERMUTATIONS, np.int32)  # Hamming distance to the chosen, summed
    nearest = np.full(MAX_PERMUTATIONS, NUM_TILES, np.int8)  # ... and the smallest of them
    chosen = [first]
    while True:
        distance = np.full(MAX_PERMUTATIONS, NUM_TILES, np.int8)
        for position, tile in enumerate(candidates[chosen[-1]]):
            distance -= columns[position] == tile
        summed += distance
        np.minimum(nearest, distance, out=nearest)
        if len(chosen) == size:
            return candidates[chosen].astype(np.int32)
        score = np.where(nearest >= min_hamming, summed, -1)  # the chosen are at distance 0
        best = int(np.argmax(score))
        if score[best] < 0:
            raise ConfigError(
                f"config.jigsaw.min_hamming={min_hamming}: no room for {size} permutations at "
                f"pairwise Hamming distance >= {min_hamming}; the greedy selection found only "
                f"{len(chosen)}: lower jigsaw.min_hamming or jigsaw.num_permutations")
        chosen.append(best)


class Jigsaw(PretextClassifier):
    """The siamese encoder on 9 shuffled tiles and a head that names the permutation."""

    CONFIG_KEYS = ("crop_size", "tile_size", "num_permutations", "min_hamming",
                   "permutation_seed", *HEAD_KEYS)
    concat = True  # one label per puzzle, from its 9 tiles' features in puzzle order

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None, **run_length: int):
        super().__init__(config, mesh, **run_length)
        cfg = self.cfg
        require(isinstance(cfg.tile_size, int) and cfg.tile_size >= 1, "jigsaw.tile_size",
                f"is {cfg.tile_size!r}: must be a positive number of pixels")
        self.cell = cfg.crop_size // tiles.GRID
        require(cfg.tile_size <= self.cell, "jigsaw.tile_size",
                f"a 3x3 grid of {cfg.tile_size}-px tiles does not fit the {cfg.crop_size}-px "
                f"crop (jigsaw.crop_size): its cells are {self.cell} px; use crop_size >= "
                f"{3 * cfg.tile_size} or smaller tiles (the paper: 64-px tiles of a 225-px crop)")
        self.check_input_side(cfg.tile_size, "jigsaw.tile_size")
        self.region = view_of_size(config.aug.view1, cfg.crop_size)
        self.permutations = permutation_set(cfg.num_permutations, cfg.min_hamming,
                                            cfg.permutation_seed)
        self.make_head(num_classes=cfg.num_permutations)

    def puzzle(self, key: jax.Array, crop: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One crop ``[c, c, 3]`` -> ``(standardised tiles in puzzle order [9, t, t, 3],
        permutation index [])``."""
        k_grid, k_label = jax.random.split(key)
        size = self.cfg.tile_size
        corners = tiles.grid_corners(k_grid, self.cell, self.cell - size)
        cells = tiles.cut_patches(crop, corners, size)
        label = jax.random.randint(k_label, (), 0, self.num_classes)
        order = jnp.asarray(self.permutations)[label]
        return tiles.standardize(cells[order]), label

    def task(self, rng: jax.Array, images: jax.Array, image_hw: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
        """uint8 ``[b, h, w, 3]`` -> ``(tiles [b, 9, t, t, 3], permutation indices [b])``."""
        k_crop, k_puzzle = jax.random.split(rng)
        crops = augment.augment_view(k_crop, images, self.region, image_hw)
        keys = jax.random.split(k_puzzle, crops.shape[0])
        return jax.vmap(self.puzzle)(keys, crops)


METHOD = Jigsaw

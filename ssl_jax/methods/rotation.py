"""Rotation prediction, RotNet (Gidaris et al. 2018, "Unsupervised Representation Learning by
Predicting Image Rotations").

Every image x of the batch is augmented once (``config.aug.view1``: crop, flip) and rotated by
each of the K angles ``r * 360 / K`` (K = 4: 0, 90, 180 and 270 degrees counter-clockwise; all of
them in the same batch, as the paper does); the shared encoder f embeds each rotated copy and a
classifier head h predicts its rotation r, eq. (1)-(3) of the paper::

    L = -1/(N K) sum_i sum_r log softmax(h(f(rot(x_i, r))))[r]

The rotations are exact (``jnp.rot90`` of the square view: no interpolation, no border a network
could read the angle from). Metrics: ``pretext_acc``, the share of rotations predicted right.

Config keys: ``config.rotation.{num_rotations, head_hidden_dim, head_layers}``: 4 (the paper's
0/90/180/270) or 2 (0/180, its ablation); the head (see ``ssl_jax.methods.pretext``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from ssl_jax.config import require
from ssl_jax.data import augment
from ssl_jax.methods.pretext import HEAD_KEYS, PretextClassifier

# Quarter turns (counter-clockwise) of each label, by the number of rotations.
QUARTER_TURNS = {4: (0, 1, 2, 3), 2: (0, 2)}


def rotate(views: jax.Array, quarter_turns: tuple[int, ...]) -> jax.Array:
    """``[b, s, s, c]`` -> ``[b, K, s, s, c]``: copy ``r`` turned by ``quarter_turns[r]`` quarter
    turns counter-clockwise (as ``np.rot90`` on each image)."""
    return jnp.stack([jnp.rot90(views, k, axes=(1, 2)) for k in quarter_turns], axis=1)


class Rotation(PretextClassifier):
    """The encoder and a head that tells which of K rotations an image went through."""

    CONFIG_KEYS = ("num_rotations", *HEAD_KEYS)
    concat = False  # one label per rotated copy

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None, **run_length: int):
        super().__init__(config, mesh, **run_length)  # checks the keys, builds self.encoder
        require(self.cfg.num_rotations in QUARTER_TURNS, "rotation.num_rotations",
                f"is {self.cfg.num_rotations!r}: use 4 (0/90/180/270 degrees) or 2 (0/180)")
        self.turns = QUARTER_TURNS[self.cfg.num_rotations]
        self.make_head(num_classes=len(self.turns))

    def task(self, rng: jax.Array, images: jax.Array, image_hw: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
        """uint8 ``[b, h, w, 3]`` -> every view in all K rotations ``[b, K, s, s, 3]``
        (normalised; the copies of image i stay together, on its device) and labels ``[b, K]``."""
        views = augment.augment_view(rng, images, self.config.aug.view1, image_hw)
        rotated = rotate(views, self.turns)
        labels = jnp.broadcast_to(jnp.arange(len(self.turns), dtype=jnp.int32),
                                  rotated.shape[:2])
        return augment.normalize(rotated), labels


METHOD = Rotation

"""What the pretext classification tasks share (rotation, relative patch position, jigsaw): labels
made on the device from the batch, the shared encoder on every input, a classifier head, and the
cross-entropy

    L = -1/n sum_i log softmax(h(z_i))[y_i]

over the ``n`` labelled examples of the global batch, with the pretext accuracy in the metrics.

A task is a subclass of :class:`PretextClassifier` that defines :meth:`~PretextClassifier.task`:
``k`` inputs per image and their labels. With ``concat=False`` the head classifies each input's
features alone (rotation: 4 rotated copies of an image, one label each); with ``concat=True`` it
classifies the concatenation of an image's ``k`` feature vectors, in order (relative position:
2 patches, jigsaw: 9 tiles; one label per image). All ``b k`` inputs go through the encoder as
one batch, so BatchNorm statistics are those of every input of the global batch.

Config keys every task has: ``config.<method>.{head_hidden_dim, head_layers}``: ``head_layers``
Dense layers, the hidden ones ``head_hidden_dim`` wide with BatchNorm and ReLU
(:class:`~ssl_jax.models.heads.ProjectionMLP` with a plain last layer); 1 is a linear head.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ssl_jax.config import require
from ssl_jax.methods.base import MethodBase
from ssl_jax.methods.ssl_math import apply_network, split_variables
from ssl_jax.models.heads import ProjectionMLP
from ssl_jax.models.vit import ViT

HEAD_KEYS = ("head_hidden_dim", "head_layers")


def classification_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(mean cross-entropy, accuracy)`` of ``logits [n, classes]`` for int ``labels [n]``,
    in float32."""
    chex.assert_rank([logits, labels], [2, 1])
    logits = logits.astype(jnp.float32)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    return loss, accuracy


def view_of_size(view: ml_collections.ConfigDict, size: int) -> ml_collections.ConfigDict:
    """A copy of the view config ``view`` (e.g. ``aug.view1``, whose size is the evaluation's
    input) that crops to ``size`` px: the region the spatial tasks cut their grid from."""
    region = ml_collections.ConfigDict(view.to_dict())
    region.size = size
    return region


class PretextClassifier(MethodBase):
    """Encoder + classifier head on labels that :meth:`task` makes from the images.

    Subclasses set :attr:`CONFIG_KEYS` (with :data:`HEAD_KEYS`), :attr:`concat`, call
    :meth:`make_head` with their number of classes in ``__init__``, and define :meth:`task`."""

    concat: bool = False

    def make_head(self, num_classes: int) -> None:
        """The classifier head ``self.head`` of ``config.<method>.head_*`` (checked here)."""
        name, cfg = self.config.method, self.cfg
        require(isinstance(cfg.head_layers, int) and cfg.head_layers >= 1,
                f"{name}.head_layers", f"is {cfg.head_layers!r}: must be >= 1 (1: a linear head)")
        require(cfg.head_layers == 1 or cfg.head_hidden_dim >= 1, f"{name}.head_hidden_dim",
                f"is {cfg.head_hidden_dim!r}: a head of {cfg.head_layers} layers needs a width "
                ">= 1")
        self.num_classes = num_classes
        self.head = ProjectionMLP(hidden_dim=cfg.head_hidden_dim, out_dim=num_classes,
                                  num_layers=cfg.head_layers, use_bn=True, last_bn=False,
                                  dtype=self.encoder.dtype)

    def check_input_side(self, side: int, key: str) -> None:
        """A ViT encoder's patches must tile the task's inputs of ``side`` px (``key`` names the
        config key that sets it). Its position embeddings, built for ``aug.view1.size`` (the
        evaluation's input), are resampled to the inputs' grid (``ssl_jax.models.vit``)."""
        if isinstance(self.encoder, ViT):
            patch = self.encoder.patch_size
            require(side % patch == 0, key,
                    f"the task's inputs are {side} px, not a multiple of the ViT's patch size "
                    f"{patch} (model.name={self.config.model.name!r}): change one of them")

    def task(self, rng: jax.Array, images: jax.Array, image_hw: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
        """uint8 ``[b, h, w, 3]`` -> ``(inputs [b, k, s, s, 3], labels)``: the encoder's inputs
        (normalised) and int32 labels, ``[b, k]`` (``concat=False``) or ``[b]``."""
        raise NotImplementedError

    def augment(self, rng: jax.Array, images: jax.Array, image_hw: jax.Array | None = None
                ) -> jax.Array:
        """The task's inputs ``[b, k, s, s, 3]`` (what the benchmarks time)."""
        return self.task(rng, images, image_hw)[0]

    def head_input(self, feats: jax.Array, batch: int) -> jax.Array:
        """Encoder features ``[b k, d]`` -> the head's input: ``[b, k d]`` (concat) or as is."""
        return feats.reshape(batch, -1) if self.concat else feats

    def logits(self, params: Any, extra: Any, inputs: jax.Array, *, train: bool,
               rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
        """``inputs [b, k, s, s, 3]`` -> ``(logits [b, classes] or [b k, classes], new extra)``."""
        b, k = inputs.shape[:2]
        x = inputs.reshape(b * k, *inputs.shape[2:])
        feats, enc_state = apply_network(self.encoder, params["encoder"], extra["encoder"], x,
                                         train=train, rng=rng)
        logits, head_state = apply_network(self.head, params["head"], extra["head"],
                                           self.head_input(feats, b), train=train)
        return logits, {"encoder": enc_state, "head": head_state}

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        k_enc, k_head, k_task = jax.random.split(rng, 3)
        inputs, _ = self.task(k_task, batch["image"])
        b, k = inputs.shape[:2]
        x = inputs.reshape(b * k, *inputs.shape[2:])
        enc_params, enc_state = split_variables(
            self.encoder.init({"params": k_enc, "dropout": k_enc}, x, train=False))
        feats, _ = apply_network(self.encoder, enc_params, enc_state, x, train=False)
        head_params, head_state = split_variables(
            self.head.init(k_head, self.head_input(feats, b), train=False))
        return ({"encoder": enc_params, "head": head_params},
                {"encoder": enc_state, "head": head_state})

    def loss(self, params, extra, batch, rng, step):
        del step
        k_task, k_drop = jax.random.split(rng)
        inputs, labels = self.task(k_task, batch["image"], batch.get("image_hw"))
        logits, extra = self.logits(params, extra, inputs, train=True, rng=k_drop)
        loss, accuracy = classification_loss(logits, labels.reshape(-1))
        return loss, ({"pretext_acc": accuracy}, extra)

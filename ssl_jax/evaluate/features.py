"""Frozen features of a run's encoder: restore it from a checkpoint (or initialise it at random
for the baseline) and embed a whole split without augmentation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ssl_jax import methods, parallel
from ssl_jax.data import pipeline
from ssl_jax.data.augment import eval_view
from ssl_jax.restore import restore_state
from ssl_jax.step import example_batch


def restore_encoder(
    workdir: epath.PathLike, config: ml_collections.ConfigDict, mesh: Mesh, step: int = -1
) -> tuple[Any, Any, int]:
    """``(method, encoder_variables, step)`` from the checkpoint ``step`` (-1: the latest)."""
    method, state, step = restore_state(workdir, config, mesh, step)
    return method, method.encoder_variables(state["params"], state["extra"]), step


def random_encoder(config: ml_collections.ConfigDict, mesh: Mesh, seed: int) -> tuple[Any, Any]:
    """The same method and encoder architecture, randomly initialised (the baseline)."""
    method = methods.create(config, mesh)
    params, extra = jax.jit(method.init)(jax.random.key(seed), example_batch(config, mesh))
    return method, method.encoder_variables(params, extra)


def extract_features(
    encoder: Any,
    variables: Any,
    config: ml_collections.ConfigDict,
    split: str,
    mesh: Mesh,
    encoder_input: Callable[[jax.Array], jax.Array] | None = None,
    embed_fn: Callable[[Any, jax.Array], jax.Array] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(features [n, d] float32, labels [n] int32)`` of every example of ``split``; the
    encoder sees ``encoder_input(normalised centre views)``: pass the method's
    ``method.encoder_input`` (None: the views themselves). ``embed_fn(variables, views)``
    replaces the encoder's own output (e.g. the evaluation protocols' last-block features)."""
    feed = encoder_input or (lambda x: x)
    apply = embed_fn or (lambda v, x: encoder.apply(v, feed(x), train=False))
    crop = config.aug.view1.size
    batch_size = config.eval.batch_size
    parallel.check_global_batch(batch_size, mesh)

    @jax.jit
    def embed(variables, images):
        return apply(variables, eval_view(images, crop))

    feats, labels = [], []
    for batch in pipeline.eval_batches(
        config.data, split, batch_size=batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
    ):
        arrays = parallel.global_batch(batch, mesh)
        out = embed(variables, arrays["image"])
        gathered = multihost_utils.process_allgather(
            {"f": out, "y": arrays["label"], "m": arrays["mask"]}, tiled=True)
        keep = np.asarray(gathered["m"]).astype(bool)
        feats.append(np.asarray(gathered["f"], np.float32)[keep])
        labels.append(np.asarray(gathered["y"], np.int32)[keep])
    return np.concatenate(feats), np.concatenate(labels)


def subsample(
    feats: np.ndarray, labels: np.ndarray, max_examples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random subset of at most ``max_examples`` rows (0: all)."""
    if not max_examples or len(labels) <= max_examples:
        return feats, labels
    idx = np.sort(np.random.default_rng(seed).permutation(len(labels))[:max_examples])
    return feats[idx], labels[idx]

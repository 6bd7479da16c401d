"""Labelled training data of the fine-tuning job: a class-balanced share of the training labels
(SimCLR's semi-supervised 1% / 10% protocol) and an endless shuffled loader over it.

The loader is ``ssl_jax.data.pipeline.train_loader`` over a subset of the training split: the same
Grain stream (global shuffle by index, a new permutation every epoch), decoding and sharding per
process, only the records are those of the chosen indices.
"""

from __future__ import annotations

from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging

from ssl_jax.config import ConfigError
from ssl_jax.data import pipeline
from ssl_jax.data.sources import make_source
from ssl_jax.evaluate.linear_probe import sample_label_fraction


def split_labels(source: Any) -> np.ndarray:
    """int32 ``[n]`` labels of every record of a source (an image folder knows them without
    reading files; a TFDS source reads every record once)."""
    labels = getattr(source, "labels", None)
    if labels is not None:
        return np.asarray(labels, np.int32)
    logging.info("reading the labels of %d records for the label fraction", len(source))
    return np.fromiter((source[i]["label"] for i in range(len(source))), np.int32, len(source))


def labelled_indices(
    data_cfg: ml_collections.ConfigDict, label_fraction: float, seed: int
) -> np.ndarray | None:
    """Sorted indices into the training split keeping ``label_fraction`` of every class (seeded),
    or None for the whole split (``label_fraction == 1``).

    Raises:
      ConfigError: naming ``label_fraction`` when it lies outside ``(0, 1]`` or leaves some class
        without an example.
    """
    if not 0.0 < label_fraction <= 1.0:
        raise ConfigError(f"config.label_fraction={label_fraction!r} must lie in (0, 1] "
                          "(e.g. 0.01 or 0.1 for SimCLR's semi-supervised subsets, 1 for all)")
    if label_fraction == 1.0:
        return None
    source = make_source(data_cfg, data_cfg.train_split)
    try:
        return sample_label_fraction(split_labels(source), label_fraction, seed)
    except ValueError as e:
        raise ConfigError(f"config.label_fraction: {e} (split {data_cfg.train_split!r} of "
                          f"{data_cfg.name!r})") from None


class SubsetSource:
    """The records ``indices`` of a source, as a source (``len``, ``[i]``, ``num_classes``)."""

    def __init__(self, source: Any, indices: np.ndarray):
        self._source = source
        self._indices = np.asarray(indices, np.int64)
        self.num_classes = source.num_classes

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._source[int(self._indices[index])]

    def __repr__(self) -> str:
        return f"SubsetSource({self._source!r}, num_records={len(self)})"


def labelled_train_loader(
    data_cfg: ml_collections.ConfigDict, indices: np.ndarray | None, *, global_batch_size: int,
    seed: int, process_index: int = 0, process_count: int = 1,
) -> grain.IterDataset:
    """Endless shuffled batches ``{'image': uint8 [b, S, S, 3], 'label': int32 [b]}`` of this
    process (``b = global_batch_size / process_count``) over ``indices`` of the training split
    (None: all of it, exactly ``pipeline.train_loader``)."""
    if indices is None:
        return pipeline.train_loader(data_cfg, global_batch_size=global_batch_size, seed=seed,
                                     process_index=process_index, process_count=process_count)
    source = SubsetSource(make_source(data_cfg, data_cfg.train_split), indices)
    return pipeline.train_loader(data_cfg, global_batch_size=global_batch_size, seed=seed,
                                 process_index=process_index, process_count=process_count,
                                 source=source)

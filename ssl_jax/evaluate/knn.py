"""Weighted k-nearest-neighbour classification on frozen features.

The protocol of Wu et al. 2018 ("Unsupervised feature learning via non-parametric instance
discrimination") as used by DINO (Caron et al. 2021): features are L2-normalised, the similarity
is the cosine ``s_ij = <x_i, x_j>``, and each of the ``k`` most similar training examples votes
for its class with weight ``exp(s_ij / T)``::

    score_c(x_i) = sum_{j in topk(i)} exp(s_ij / T) * [y_j == c],   y_hat_i = argmax_c score_c

The functions here take feature arrays only; restoring a checkpoint and extracting features is
the evaluation job's business. The input checks (`check_features`, `check_labels`) are shared
with the linear probe.
"""

from __future__ import annotations

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
DEFAULT_CHUNK_SIZE = 1024


def check_features(name: str, feats, dim: int | None = None) -> np.ndarray:
    """Returns `feats` as a float32 array `[n, d]`, raising ValueError on bad input.

    Args:
      name: the argument's name, used in error messages.
      feats: array-like `[n, d]`, finite, with at least one row.
      dim: the feature dimension `d` it must have, if known (e.g. that of the train features).
    """
    x = np.asarray(feats)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [num_examples, dim], got shape {x.shape}.")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}); pass at least one example.")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be a real-valued array, got dtype {x.dtype}.")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x).all(axis=1)))
        raise ValueError(
            f"{name} contains NaN or infinite values in {bad} row(s); "
            "check the feature extraction (e.g. a diverged checkpoint)."
        )
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"{name} has feature dimension {x.shape[1]} but the training features have {dim}; "
            "extract both with the same encoder."
        )
    return x


def check_labels(name: str, labels, num_examples: int, num_classes: int) -> np.ndarray:
    """Returns `labels` as an int32 array `[num_examples]`, raising ValueError on bad input.

    Args:
      name: the argument's name, used in error messages.
      labels: integer array-like `[num_examples]` with values in `[0, num_classes)`.
      num_examples: the number of rows of the matching features.
      num_classes: the number of classes.
    """
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array [num_examples], got shape {y.shape}.")
    if y.shape[0] != num_examples:
        raise ValueError(
            f"{name} has {y.shape[0]} entries but the matching features have {num_examples} "
            "rows; features and labels must have the same length."
        )
    if not np.issubdtype(y.dtype, np.integer):
        whole = np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)
        if not whole:
            raise ValueError(f"{name} must hold integer class ids, got dtype {y.dtype}.")
        y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{name} has values in [{y.min()}, {y.max()}] but must lie in [0, num_classes) = "
            f"[0, {num_classes}); check num_classes or the label mapping."
        )
    return y.astype(np.int32)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows of `x` `[n, d]` divided by their Euclidean norm (zero rows stay zero)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _chunk_scores(
    train_feats: jax.Array,
    train_labels: jax.Array,
    test_feats: jax.Array,
    *,
    k: int,
    num_classes: int,
    temperature: float,
) -> jax.Array:
    """Class scores `[chunk, num_classes]` for normalised test rows `[chunk, d]`."""
    sims = jnp.matmul(test_feats, train_feats.T, precision=jax.lax.Precision.HIGHEST)
    top_sims, top_idx = jax.lax.top_k(sims, k)  # [chunk, k]
    weights = jnp.exp(top_sims / temperature)
    onehot = jax.nn.one_hot(train_labels[top_idx], num_classes, dtype=weights.dtype)
    return jnp.einsum("ck,ckn->cn", weights, onehot)


def _resolve_k(k: int, num_train: int) -> int:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    if k > num_train:
        warnings.warn(
            f"k={k} is larger than the number of training examples ({num_train}); "
            f"using k={num_train} (every training example votes).",
            stacklevel=3,
        )
        return num_train
    return int(k)


def knn_scores(
    train_feats,
    train_labels,
    test_feats,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> np.ndarray:
    """Weighted kNN class scores `score_c(x_i) = sum_{j in topk(i)} exp(s_ij / T) [y_j == c]`.

    Test rows are processed `chunk_size` at a time (the last chunk is padded so that one
    compilation serves all chunks), so memory is `O(chunk_size * num_train)`, not
    `O(num_test * num_train)`.

    Args:
      train_feats: `[n, d]` training features (not necessarily normalised).
      train_labels: `[n]` integer labels in `[0, num_classes)`.
      test_feats: `[m, d]` test features.
      num_classes: the number of classes C.
      k: the number of neighbours; if larger than `n` it is clamped to `n` with a warning.
      temperature: `T` in `exp(s / T)`; must be positive.
      chunk_size: test rows per jitted call.

    Returns:
      `[m, num_classes]` float32 scores.
    """
    train = check_features("train_feats", train_feats)
    test = check_features("test_feats", test_feats, dim=train.shape[1])
    labels = check_labels("train_labels", train_labels, train.shape[0], num_classes)
    k = _resolve_k(k, train.shape[0])
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}.")
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")

    train_n = l2_normalize(jnp.asarray(train))
    labels_j = jnp.asarray(labels)
    num_test = test.shape[0]
    chunk = min(int(chunk_size), num_test)
    out = np.empty((num_test, num_classes), np.float32)
    for start in range(0, num_test, chunk):
        rows = test[start : start + chunk]
        valid = rows.shape[0]
        if valid < chunk:
            rows = np.pad(rows, ((0, chunk - valid), (0, 0)))
        scores = _chunk_scores(
            train_n,
            labels_j,
            l2_normalize(jnp.asarray(rows)),
            k=k,
            num_classes=int(num_classes),
            temperature=float(temperature),
        )
        chex.assert_shape(scores, (chunk, num_classes))
        out[start : start + valid] = np.asarray(scores)[:valid]
    return out


def knn_predict(
    train_feats,
    train_labels,
    test_feats,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> np.ndarray:
    """Predicted classes `[m]` (int32) of `test_feats` `[m, d]`: argmax of `knn_scores`.

    Ties between classes go to the lowest class id. See `knn_scores` for the arguments.
    """
    scores = knn_scores(
        train_feats, train_labels, test_feats, num_classes, k, temperature, chunk_size
    )
    return np.argmax(scores, axis=1).astype(np.int32)


def knn_top1(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> float:
    """Top-1 accuracy in `[0, 1]` of the weighted kNN classifier on `test_labels` `[m]`."""
    pred = knn_predict(
        train_feats, train_labels, test_feats, num_classes, k, temperature, chunk_size
    )
    test_y = check_labels("test_labels", test_labels, pred.shape[0], num_classes)
    return float(np.mean(pred == test_y))

"""Linear probe: multinomial logistic regression on frozen features.

Protocol (the usual one for self-supervised evaluation, e.g. SimCLR, DINO, MAE):

1. optionally keep only `label_fraction` of the training labels, class-balanced
   (`sample_label_fraction`, SimCLR's semi-supervised subsets);
2. hold out `val_fraction` of the training split, class-stratified and seeded, as validation;
3. train one classifier per (learning rate, weight decay) in the grid on the rest and pick the
   setting with the best validation top-1 (the test split is never looked at);
4. retrain on the whole training split with that setting and report test top-1.

The classifier is `logits = x W + b` with `W: [d, C]`, `b: [C]`, both initialised to zero, trained
on the L2-regularised cross-entropy (the regulariser covers `W` only, not the bias)::

    L(W, b) = mean_i -log softmax(x_i W + b)_{y_i} + (wd / 2) ||W||_F^2

The optimiser is Adam with a cosine decay of the learning rate to zero over all steps. With the
penalty in the loss (not decoupled weight decay) the objective does not depend on the optimiser,
so the grid compares regularisation strengths, not optimiser quirks; Adam on standardised
features converges in a few tens of epochs for every learning rate of the default grid. All
settings of the grid train at once: one jitted function `vmap`s the update over the grid and
`lax.scan`s over epochs and steps, with the same mini-batches for every setting.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssl_jax.evaluate.knn import check_features, check_labels

DEFAULT_LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 0.1)
DEFAULT_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)
DEFAULT_EPOCHS = 30
DEFAULT_BATCH_SIZE = 1024
NORMALIZE_MODES = ("standardize", "batchnorm", "none")
BATCHNORM_EPS = 1e-6  # MAE's BatchNorm1d(affine=False, eps=1e-6)
_EVAL_ROWS = 4096

Params = dict[str, jax.Array]


def sample_label_fraction(labels, fraction: float, seed: int) -> np.ndarray:
    """Indices of a class-balanced subset holding `fraction` of the labelled examples.

    Each class present in `labels` keeps `round(fraction * count_c)` of its examples, drawn
    without replacement with `np.random.default_rng(seed)` (SimCLR's 1% / 10% ImageNet subsets).

    Args:
      labels: `[n]` integer class ids.
      fraction: share of the labels to keep, in `(0, 1]`.
      seed: the sampling seed; the same seed gives the same subset.

    Returns:
      `[n_kept]` int64 indices into `labels`, sorted.

    Raises:
      ValueError: if `fraction` is outside `(0, 1]` or would leave some class with no example.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {y.shape}, {y.dtype}.")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must lie in (0, 1], got {fraction!r}.")
    if fraction == 1.0:
        return np.arange(y.shape[0], dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    keep = np.floor(fraction * counts + 0.5).astype(np.int64)
    if (keep == 0).any():
        c = int(classes[np.argmax(keep == 0)])
        n_c = int(counts[classes == c][0])
        raise ValueError(
            f"label_fraction={fraction} keeps no example of class {c} ({n_c} labelled); "
            f"use label_fraction >= {1 / n_c:.3g} so that every class keeps at least one."
        )
    chosen = [
        rng.choice(np.flatnonzero(y == c), size=int(m), replace=False)
        for c, m in zip(classes, keep, strict=True)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def stratified_split(labels, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-stratified, seeded split of `[n]` labels into (fit, validation) index arrays.

    Each class sends `round(val_fraction * count_c)` examples to validation but keeps at least
    one for fitting. Both arrays are sorted.
    """
    y = np.asarray(labels)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction!r}.")
    rng = np.random.default_rng([seed, 1])
    val = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = min(int(np.floor(val_fraction * idx.size + 0.5)), idx.size - 1)
        val.append(idx[:n_val])
    val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    fit_idx = np.setdiff1d(np.arange(y.shape[0]), val_idx).astype(np.int64)
    return fit_idx, val_idx


def fit_normalization(train_feats: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature `(mean, scale)`, each `[d]`, from the training features `[n, d]` only.

    `x_normalised = (x - mean) / scale`, with
      - 'standardize': `scale = std` (features constant on the training set get `scale = 1`);
      - 'batchnorm': `scale = sqrt(var + 1e-6)`, MAE's `BatchNorm1d(affine=False, eps=1e-6)`
        before the linear head. A BatchNorm without affine parameters in front of a linear
        layer only standardises; MAE's evaluation uses its running statistics, which converge
        to the training-set statistics, so it is implemented as standardisation with those;
      - 'none': `mean = 0`, `scale = 1`.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {mode!r}.")
    d = train_feats.shape[1]
    if mode == "none":
        return np.zeros(d, np.float32), np.ones(d, np.float32)
    x = np.asarray(train_feats, np.float64)
    mean = x.mean(axis=0)
    var = x.var(axis=0)
    if mode == "batchnorm":
        scale = np.sqrt(var + BATCHNORM_EPS)
    else:
        scale = np.sqrt(var)
        scale = np.where(scale > 0, scale, 1.0)
    return mean.astype(np.float32), scale.astype(np.float32)


def _normalize(x: np.ndarray, stats: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    mean, scale = stats
    return ((x - mean) / scale).astype(np.float32)


def _optimizer(learning_rate: jax.Array, total_steps: int) -> optax.GradientTransformation:
    return optax.adam(optax.cosine_decay_schedule(learning_rate, total_steps))


def _loss(params: Params, x: jax.Array, y: jax.Array, weight_decay: jax.Array) -> jax.Array:
    logits = x @ params["w"] + params["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * weight_decay * jnp.sum(params["w"] ** 2)


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size"))
def train_linear_classifiers(
    feats: jax.Array,
    labels: jax.Array,
    learning_rates: jax.Array,
    weight_decays: jax.Array,
    key: jax.Array,
    *,
    num_classes: int,
    epochs: int,
    batch_size: int,
) -> Params:
    """Trains S linear classifiers at once, one per (learning rate, weight decay) pair.

    Every epoch draws a fresh permutation of the examples (the last incomplete batch is
    dropped, a different one every epoch); all S classifiers see the same mini-batches.

    Args:
      feats: `[n, d]` (already normalised) features, `n >= batch_size`.
      labels: `[n]` int32 labels in `[0, num_classes)`.
      learning_rates: `[S]` peak learning rates.
      weight_decays: `[S]` L2 penalty coefficients on `W`.
      key: PRNG key for the mini-batch order.
      num_classes: C.
      epochs: passes over the data.
      batch_size: examples per step.

    Returns:
      `{'w': [S, d, C], 'b': [S, C]}`.
    """
    n, d = feats.shape
    num_settings = learning_rates.shape[0]
    chex.assert_shape(weight_decays, (num_settings,))
    chex.assert_shape(labels, (n,))
    steps_per_epoch = n // batch_size
    total_steps = epochs * steps_per_epoch

    params = {
        "w": jnp.zeros((num_settings, d, num_classes), jnp.float32),
        "b": jnp.zeros((num_settings, num_classes), jnp.float32),
    }
    opt_state = jax.vmap(lambda p, lr: _optimizer(lr, total_steps).init(p))(params, learning_rates)

    def update_one(p, s, lr, wd, x, y):
        grads = jax.grad(_loss)(p, x, y, wd)
        updates, s = _optimizer(lr, total_steps).update(grads, s, p)
        return optax.apply_updates(p, updates), s

    update_all = jax.vmap(update_one, in_axes=(0, 0, 0, 0, None, None))

    def step(carry, idx):
        p, s = carry
        return update_all(p, s, learning_rates, weight_decays, feats[idx], labels[idx]), None

    def epoch(carry, epoch_key):
        order = jax.random.permutation(epoch_key, n)[: steps_per_epoch * batch_size]
        return jax.lax.scan(step, carry, order.reshape(steps_per_epoch, batch_size))[0], None

    (params, _), _ = jax.lax.scan(epoch, (params, opt_state), jax.random.split(key, epochs))
    return params


@jax.jit
def _correct(params: Params, feats: jax.Array, labels: jax.Array) -> jax.Array:
    logits = jnp.einsum("nd,sdc->snc", feats, params["w"]) + params["b"][:, None, :]
    return jnp.sum(jnp.argmax(logits, axis=-1) == labels[None, :], axis=1)


def top1_accuracy(params: Params, feats: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Top-1 accuracy `[S]` of each of the S classifiers `params` on `[m, d]` features."""
    m = feats.shape[0]
    rows = min(_EVAL_ROWS, m)
    correct = np.zeros(params["w"].shape[0], np.int64)
    for start in range(0, m, rows):
        x, y = feats[start : start + rows], labels[start : start + rows]
        valid = x.shape[0]
        if valid < rows:
            x = np.pad(x, ((0, rows - valid), (0, 0)))
            y = np.pad(y, (0, rows - valid), constant_values=-1)  # never matches a prediction
        correct += np.asarray(_correct(params, jnp.asarray(x), jnp.asarray(y)))
    return correct / m


def _train_and_score(
    fit_x: np.ndarray,
    fit_y: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    settings: Sequence[tuple[float, float]],
    normalize: str,
    num_classes: int,
    epochs: int,
    batch_size: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalises with `fit_x` statistics, trains every setting; returns (fit, eval) top-1 `[S]`."""
    stats = fit_normalization(fit_x, normalize)
    fit_x, eval_x = _normalize(fit_x, stats), _normalize(eval_x, stats)
    lrs = jnp.asarray([lr for lr, _ in settings], jnp.float32)
    wds = jnp.asarray([wd for _, wd in settings], jnp.float32)
    params = train_linear_classifiers(
        jnp.asarray(fit_x),
        jnp.asarray(fit_y),
        lrs,
        wds,
        jax.random.key(seed),
        num_classes=num_classes,
        epochs=epochs,
        batch_size=min(batch_size, fit_x.shape[0]),
    )
    return top1_accuracy(params, fit_x, fit_y), top1_accuracy(params, eval_x, eval_y)


def _check_grid(name: str, values: Sequence[float], positive: bool) -> tuple[float, ...]:
    values = tuple(float(v) for v in np.atleast_1d(np.asarray(values, np.float64)))
    bad = [v for v in values if not np.isfinite(v) or (v <= 0 if positive else v < 0)]
    if not values or bad:
        need = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a non-empty sequence of {need} numbers, got {values}.")
    return values


def linear_probe(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    num_classes: int,
    *,
    learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.1,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    normalize: str = "standardize",
    label_fraction: float = 1.0,
) -> dict[str, Any]:
    """Linear-probe top-1 of frozen features, hyper-parameters chosen on a validation split.

    Args:
      train_feats: `[n, d]` training features.
      train_labels: `[n]` integer labels in `[0, num_classes)`.
      test_feats: `[m, d]` test features.
      test_labels: `[m]` integer labels in `[0, num_classes)`.
      num_classes: C.
      learning_rates: peak Adam learning rates of the grid (cosine-decayed to zero).
      weight_decays: L2 penalty coefficients `wd` of the grid (on `W` only).
      val_fraction: share of the (label-subsampled) training split held out, class-stratified,
        to choose the setting; 0 is allowed only for a grid with a single setting.
      epochs: passes over the training data, for the grid search and the final retrain.
      batch_size: mini-batch size (capped at the number of training examples).
      seed: seeds the label subset, the validation split and the mini-batch order.
      normalize: 'standardize', 'batchnorm' (MAE) or 'none'; see `fit_normalization`.
        Statistics always come from the features being trained on, never from val/test.
      label_fraction: share of the training labels to use, class-balanced, in `(0, 1]`.

    Returns:
      A dict with `test_top1`, `val_top1` (of the chosen setting; None without validation),
      `train_top1` (final classifier on its training data), `best_learning_rate`,
      `best_weight_decay`, `grid` (a list of `{'learning_rate', 'weight_decay', 'val_top1'}`
      in grid order), and `num_train`, `num_val`, `num_test`. Ties on validation top-1 go to
      the first setting in grid order (learning rates outer, weight decays inner).
    """
    train_x = check_features("train_feats", train_feats)
    test_x = check_features("test_feats", test_feats, dim=train_x.shape[1])
    train_y = check_labels("train_labels", train_labels, train_x.shape[0], num_classes)
    test_y = check_labels("test_labels", test_labels, test_x.shape[0], num_classes)
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}.")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    settings = list(
        itertools.product(
            _check_grid("learning_rates", learning_rates, positive=True),
            _check_grid("weight_decays", weight_decays, positive=False),
        )
    )
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction!r}.")
    if val_fraction == 0.0 and len(settings) > 1:
        raise ValueError(
            f"val_fraction=0 leaves no validation data to choose among {len(settings)} settings; "
            "use val_fraction > 0 or pass a single learning rate and weight decay."
        )

    subset = sample_label_fraction(train_y, label_fraction, seed)
    train_x, train_y = train_x[subset], train_y[subset]
    common = dict(
        normalize=normalize, num_classes=num_classes, epochs=epochs, batch_size=batch_size
    )

    num_val, val_top1, grid = 0, None, []
    best = settings[0]
    if val_fraction > 0.0:
        fit_idx, val_idx = stratified_split(train_y, val_fraction, seed)
        if val_idx.size == 0:
            raise ValueError(
                f"val_fraction={val_fraction} of {train_y.size} training examples leaves no "
                "validation example (every class keeps one for fitting); raise val_fraction."
            )
        num_val = int(val_idx.size)
        _, val_acc = _train_and_score(
            train_x[fit_idx],
            train_y[fit_idx],
            train_x[val_idx],
            train_y[val_idx],
            settings,
            seed=seed,
            **common,
        )
        grid = [
            {"learning_rate": lr, "weight_decay": wd, "val_top1": float(acc)}
            for (lr, wd), acc in zip(settings, val_acc, strict=True)
        ]
        chosen = int(np.argmax(val_acc))
        best, val_top1 = settings[chosen], float(val_acc[chosen])

    train_acc, test_acc = _train_and_score(
        train_x, train_y, test_x, test_y, [best], seed=seed, **common
    )
    return {
        "test_top1": float(test_acc[0]),
        "val_top1": val_top1,
        "train_top1": float(train_acc[0]),
        "best_learning_rate": best[0],
        "best_weight_decay": best[1],
        "grid": grid,
        "num_train": int(train_y.size),
        "num_val": num_val,
        "num_test": int(test_y.size),
    }

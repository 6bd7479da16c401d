"""Tests for the evaluation algorithms on cached features: weighted kNN and the linear probe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.evaluate.knn import knn_predict, knn_scores, knn_top1
from ssl_jax.evaluate.linear_probe import (
    BATCHNORM_EPS,
    fit_normalization,
    linear_probe,
    sample_label_fraction,
    stratified_split,
    train_linear_classifiers,
)

SMALL_GRID = dict(learning_rates=(0.01, 0.1), weight_decays=(0.0, 1e-3), epochs=10, batch_size=64)


def blobs(n, num_classes=4, dim=8, spread=0.3, seed=0):
    """Gaussian blobs around well-separated random centres: `([n, dim], [n])`."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).normal(size=(num_classes, dim)) * 3.0
    labels = rng.integers(0, num_classes, n)
    return (centres[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


# ---------------------------------------------------------------------------------------- kNN


def knn_reference(train, labels, test, num_classes, k, temperature):
    """Plain NumPy transcription: cosine top-k, votes exp(s / T) per class (float64)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    scores = np.zeros((test.shape[0], num_classes))
    for i, x in enumerate(test):
        sims = train @ x
        for j in np.argsort(-sims)[:k]:
            scores[i, labels[j]] += np.exp(sims[j] / temperature)
    return scores


@pytest.mark.parametrize("k,temperature", [(20, 0.07), (7, 0.5), (1, 0.07)])
def test_knn_matches_numpy_reference(k, temperature):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 16))
    labels = rng.integers(0, 5, 300)
    test = rng.normal(size=(50, 16))
    ref = knn_reference(train, labels, test, 5, k, temperature)
    # chunk_size=16 does not divide 50: the padded last chunk must not leak into the result.
    got = knn_scores(train, labels, test, 5, k=k, temperature=temperature, chunk_size=16)
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    pred = knn_predict(train, labels, test, 5, k=k, temperature=temperature, chunk_size=16)
    np.testing.assert_array_equal(pred, ref.argmax(axis=1))
    test_labels = rng.integers(0, 5, 50)
    acc = knn_top1(train, labels, test, test_labels, 5, k=k, temperature=temperature)
    assert acc == pytest.approx(np.mean(ref.argmax(axis=1) == test_labels))


def test_knn_chunk_size_does_not_change_scores():
    rng = np.random.default_rng(1)
    train, labels, test = (
        rng.normal(size=(200, 8)),
        rng.integers(0, 3, 200),
        rng.normal(size=(37, 8)),
    )
    a = knn_scores(train, labels, test, 3, k=5, chunk_size=5)
    b = knn_scores(train, labels, test, 3, k=5, chunk_size=1024)
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_knn_well_separated_clusters_are_perfect():
    train, train_y = blobs(400, spread=0.1)
    test, test_y = blobs(200, spread=0.1, seed=1)
    assert knn_top1(train, train_y, test, test_y, 4) == 1.0


def test_knn_scale_invariant():
    rng = np.random.default_rng(2)
    train, labels, test = (
        rng.normal(size=(100, 8)),
        rng.integers(0, 3, 100),
        rng.normal(size=(20, 8)),
    )
    a = knn_predict(train, labels, test, 3)
    b = knn_predict(train * 7.0, labels, test * 0.01, 3)
    np.testing.assert_array_equal(a, b)


def test_knn_k_larger_than_train_set_is_clamped_with_warning():
    rng = np.random.default_rng(3)
    train, labels, test = (
        rng.normal(size=(6, 4)),
        np.array([0, 1, 2, 0, 1, 2]),
        rng.normal(size=(5, 4)),
    )
    with pytest.warns(UserWarning, match="k=20"):
        got = knn_scores(train, labels, test, 3, k=20, temperature=0.5)
    np.testing.assert_allclose(got, knn_reference(train, labels, test, 3, 6, 0.5), rtol=1e-5)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(train_labels=np.zeros(9, int)), "train_labels"),
        (dict(train_labels=np.full(10, 3)), r"train_labels.*num_classes"),
        (dict(test_feats=np.full((4, 5), np.nan)), "test_feats.*NaN"),
        (dict(train_feats=np.ones((10, 5, 1))), "train_feats"),
        (dict(test_feats=np.ones((4, 6))), "test_feats.*dimension"),
        (dict(temperature=0.0), "temperature"),
        (dict(k=0), "k must"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_knn_bad_inputs_raise(change, match):
    args = dict(
        train_feats=np.ones((10, 5)),
        train_labels=np.zeros(10, int),
        test_feats=np.ones((4, 5)),
        num_classes=3,
        k=3,
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        knn_predict(**args)


# ------------------------------------------------------------------------ label-fraction sampler


def test_sample_label_fraction_is_class_balanced_and_seeded():
    labels = np.repeat([0, 1, 2], [100, 50, 30])
    idx = sample_label_fraction(labels, 0.1, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[idx]), [10, 5, 3])
    assert len(np.unique(idx)) == len(idx) and idx.min() >= 0 and idx.max() < len(labels)
    np.testing.assert_array_equal(idx, sample_label_fraction(labels, 0.1, seed=0))
    assert not np.array_equal(idx, sample_label_fraction(labels, 0.1, seed=1))
    np.testing.assert_array_equal(sample_label_fraction(labels, 1.0, seed=0), np.arange(180))


def test_sample_label_fraction_raises_when_a_class_would_be_empty():
    labels = np.repeat([0, 1], [100, 3])
    with pytest.raises(ValueError, match=r"label_fraction.*class 1"):
        sample_label_fraction(labels, 0.1, seed=0)
    with pytest.raises(ValueError, match="label_fraction"):
        sample_label_fraction(labels, 0.0, seed=0)
    with pytest.raises(ValueError, match="label_fraction"):
        sample_label_fraction(labels, 1.5, seed=0)


def test_stratified_split_is_disjoint_stratified_and_seeded():
    labels = np.repeat([0, 1, 2], [100, 40, 1])
    fit, val = stratified_split(labels, 0.1, seed=0)
    assert np.intersect1d(fit, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([fit, val])), np.arange(141))
    np.testing.assert_array_equal(np.bincount(labels[val], minlength=3), [10, 4, 0])
    np.testing.assert_array_equal(val, stratified_split(labels, 0.1, seed=0)[1])
    assert not np.array_equal(val, stratified_split(labels, 0.1, seed=1)[1])


# ------------------------------------------------------------------------------ linear probe


def test_normalization_statistics_come_from_the_given_features():
    rng = np.random.default_rng(0)
    x = rng.normal(loc=3.0, scale=[1.0, 2.0, 0.5], size=(500, 3))
    x[:, 2] = 4.0  # constant on train: must not divide by zero
    mean, scale = fit_normalization(x, "standardize")
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(scale, [x[:, 0].std(), x[:, 1].std(), 1.0], rtol=1e-6)
    mean_bn, scale_bn = fit_normalization(x, "batchnorm")
    np.testing.assert_allclose(mean_bn, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(scale_bn, np.sqrt(x.var(0) + BATCHNORM_EPS), rtol=1e-6)
    mean_none, scale_none = fit_normalization(x, "none")
    assert not mean_none.any() and (scale_none == 1).all()


def test_linear_probe_separable_blobs():
    train, train_y = blobs(640)
    test, test_y = blobs(320, seed=1)
    result = linear_probe(train, train_y, test, test_y, 4, **SMALL_GRID)
    assert result["test_top1"] > 0.95 and result["val_top1"] > 0.95
    assert len(result["grid"]) == 4 and result["num_val"] > 0
    assert result["num_train"] == 640 and result["num_test"] == 320
    best = max(result["grid"], key=lambda g: g["val_top1"])
    assert result["val_top1"] == best["val_top1"]


@pytest.mark.parametrize("normalize", ["batchnorm", "none"])
def test_linear_probe_other_normalizations(normalize):
    train, train_y = blobs(640)
    test, test_y = blobs(320, seed=1)
    result = linear_probe(train, train_y, test, test_y, 4, normalize=normalize, **SMALL_GRID)
    assert result["test_top1"] > 0.95


def test_linear_probe_random_labels_near_chance_and_test_never_used_for_selection():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(640, 8)), rng.normal(size=(320, 8))
    train_y, test_y = rng.integers(0, 4, 640), rng.integers(0, 4, 320)
    a = linear_probe(train, train_y, test, test_y, 4, **SMALL_GRID)
    assert abs(a["test_top1"] - 0.25) < 0.1 and abs(a["val_top1"] - 0.25) < 0.15
    # Other test labels and features: the validation grid and the choice must not move.
    b = linear_probe(train, train_y, test[::-1] * 2.0, (test_y + 1) % 4, 4, **SMALL_GRID)
    assert a["grid"] == b["grid"]
    assert (a["best_learning_rate"], a["best_weight_decay"], a["val_top1"]) == (
        b["best_learning_rate"],
        b["best_weight_decay"],
        b["val_top1"],
    )
    assert a["test_top1"] != b["test_top1"]


def test_linear_probe_normalizes_test_with_train_statistics():
    # Classes differ along feature 0 only; the test split is shifted far along it. Train
    # statistics map every shifted test point to class 1; test statistics would undo the shift.
    rng = np.random.default_rng(0)
    train_y, test_y = rng.integers(0, 2, 640), rng.integers(0, 2, 320)
    train = rng.normal(size=(640, 8)) + 4.0 * np.eye(8)[0] * (2 * train_y[:, None] - 1)
    test = rng.normal(size=(320, 8)) + 4.0 * np.eye(8)[0] * (2 * test_y[:, None] - 1)
    aligned = linear_probe(train, train_y, test, test_y, 2, **SMALL_GRID)
    shifted = linear_probe(train, train_y, test + 20.0 * np.eye(8)[0], test_y, 2, **SMALL_GRID)
    assert aligned["test_top1"] > 0.95
    assert shifted["test_top1"] == pytest.approx(np.mean(test_y == 1), abs=0.02)


def test_linear_probe_label_fraction():
    train, train_y = blobs(640)
    test, test_y = blobs(320, seed=1)
    result = linear_probe(train, train_y, test, test_y, 4, label_fraction=0.25, **SMALL_GRID)
    assert result["num_train"] == len(sample_label_fraction(train_y, 0.25, 0))
    assert result["num_train"] < 200 and result["test_top1"] > 0.9
    with pytest.raises(ValueError, match="label_fraction"):
        linear_probe(train, train_y, test, test_y, 4, label_fraction=1e-3, **SMALL_GRID)


def test_grid_training_matches_training_each_setting_alone():
    x, y = blobs(256)
    x, y = jnp.asarray(x), jnp.asarray(y)
    lrs, wds = jnp.array([0.01, 0.1, 0.03]), jnp.array([0.0, 1e-2, 1e-3])
    kwargs = dict(num_classes=4, epochs=3, batch_size=64)
    together = train_linear_classifiers(x, y, lrs, wds, jax.random.key(0), **kwargs)
    for s in range(3):
        alone = train_linear_classifiers(
            x, y, lrs[s : s + 1], wds[s : s + 1], jax.random.key(0), **kwargs
        )
        np.testing.assert_allclose(together["w"][s], alone["w"][0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(together["b"][s], alone["b"][0], rtol=1e-4, atol=1e-6)


def test_weight_decay_applies_to_weights_not_bias():
    # With a huge penalty W -> 0, and the free bias learns the class prior: softmax(b) = freq.
    x, _ = blobs(512)
    y = np.repeat([0, 1, 2, 3], [256, 128, 64, 64])
    params = train_linear_classifiers(
        jnp.asarray(x),
        jnp.asarray(y),
        jnp.array([0.05]),
        jnp.array([100.0]),
        jax.random.key(0),
        num_classes=4,
        epochs=20,
        batch_size=128,
    )
    assert float(jnp.abs(params["w"]).max()) < 1e-2
    np.testing.assert_allclose(jax.nn.softmax(params["b"][0]), [0.5, 0.25, 0.125, 0.125], atol=0.02)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(train_labels=np.zeros(19, int)), "train_labels.*same length"),
        (dict(test_labels=np.full(8, 5)), r"test_labels.*num_classes"),
        (dict(train_labels=-np.ones(20, int)), "train_labels"),
        (dict(train_feats=np.where(np.eye(20, 4) > 0, np.nan, 1.0)), "train_feats.*NaN"),
        (dict(test_feats=np.ones((8, 3))), "test_feats.*dimension"),
        (dict(normalize="layernorm"), "normalize"),
        (dict(val_fraction=0.0), "val_fraction"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(learning_rates=()), "learning_rates"),
        (dict(weight_decays=(-1.0,)), "weight_decays"),
        (dict(epochs=0), "epochs"),
    ],
)
def test_linear_probe_bad_inputs_raise(change, match):
    rng = np.random.default_rng(0)
    args = dict(
        train_feats=rng.normal(size=(20, 4)),
        train_labels=np.arange(20) % 3,
        test_feats=rng.normal(size=(8, 4)),
        test_labels=np.arange(8) % 3,
        num_classes=3,
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        linear_probe(**args)


def test_linear_probe_single_setting_without_validation():
    train, train_y = blobs(640)
    test, test_y = blobs(320, seed=1)
    result = linear_probe(
        train,
        train_y,
        test,
        test_y,
        4,
        learning_rates=(0.1,),
        weight_decays=(0.0,),
        val_fraction=0.0,
        epochs=10,
        batch_size=64,
    )
    assert result["val_top1"] is None and result["grid"] == [] and result["num_val"] == 0
    assert result["best_learning_rate"] == 0.1 and result["test_top1"] > 0.95

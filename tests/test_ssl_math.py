"""The shared maths of the methods (ssl_jax.methods.ssl_math) against NumPy references: EMA,
schedules, centring, the stop-gradient teacher, NT-Xent and InfoNCE with global negatives (1
device vs 8 forced CPU devices), MoCo's queue and InfoNCE against it, BatchNorm in groups,
patchify, the collapse indicator."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import parallel
from ssl_jax.methods import ssl_math

# --- Teacher-student ----------------------------------------------------------------------------


def test_ema_matches_numpy_leaf_by_leaf():
    rng = np.random.default_rng(0)
    teacher = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": {"c": np.zeros(2, np.float32)}}
    student = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": {"c": np.ones(2, np.float32)}}
    out = ssl_math.ema(jax.tree_util.tree_map(jnp.asarray, teacher),
                       jax.tree_util.tree_map(jnp.asarray, student), 0.9)
    np.testing.assert_allclose(out["a"], 0.9 * teacher["a"] + 0.1 * student["a"], rtol=1e-6)
    np.testing.assert_allclose(out["b"]["c"], np.full(2, 0.1), rtol=1e-6)
    assert out["a"].dtype == jnp.float32
    # momentum 1 keeps the teacher, 0 copies the student
    np.testing.assert_array_equal(ssl_math.ema(teacher, student, 1.0)["a"], teacher["a"])
    np.testing.assert_array_equal(ssl_math.ema(teacher, student, 0.0)["a"], student["a"])


def test_cosine_momentum_matches_formula():
    steps = np.arange(0, 130, 3)
    got = np.array([float(ssl_math.cosine_momentum(jnp.int32(i), 0.996, 100)) for i in steps])
    ref = 1 - (1 - 0.996) * (np.cos(np.pi * np.minimum(steps, 100) / 100) + 1) / 2
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert got[0] == pytest.approx(0.996) and got[-1] == pytest.approx(1.0)


def test_update_center_is_the_mean_over_all_leading_axes():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(6, 2, 7)) * 3
    c = rng.normal(size=(7,))
    new = ssl_math.update_center(jnp.asarray(c, jnp.float32), jnp.asarray(t, jnp.float32), 0.9)
    np.testing.assert_allclose(new, 0.9 * c + 0.1 * t.reshape(-1, 7).mean(0), rtol=1e-5)
    new2 = ssl_math.update_center(jnp.asarray(c, jnp.float32), jnp.asarray(t[:, 0]), 0.5)
    np.testing.assert_allclose(new2, 0.5 * c + 0.5 * t[:, 0].mean(0), rtol=1e-5)
    grad = jax.grad(lambda x: ssl_math.update_center(jnp.zeros(7), x, 0.9).sum())(
        jnp.asarray(t, jnp.float32))
    assert float(jnp.abs(grad).max()) == 0.0  # no gradient into the teacher's outputs


class _BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(3)(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)


def test_teacher_forward_updates_its_statistics_and_passes_no_gradient():
    net = _BNNet()
    x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 4)) * 2 + 1, jnp.float32)
    params, state = ssl_math.split_variables(net.init(jax.random.key(0), x, train=False))
    out, new_state = ssl_math.teacher_forward(net, params, state, x)
    h = np.asarray(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    # training-mode BatchNorm: the batch's statistics normalise, the running mean moves to them
    np.testing.assert_allclose(np.asarray(out).mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(new_state["batch_stats"]["BatchNorm_0"]["mean"],
                               0.5 * h.mean(0), rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda p: ssl_math.teacher_forward(net, p, state, x)[0].sum())(params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grad))
    # apply_network in evaluation mode uses the running statistics and changes nothing
    out_eval, same = ssl_math.apply_network(net, params, new_state, x, train=False)
    assert same is new_state
    mean = np.asarray(new_state["batch_stats"]["BatchNorm_0"]["mean"])
    var = np.asarray(new_state["batch_stats"]["BatchNorm_0"]["var"])
    np.testing.assert_allclose(out_eval, (h - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)


# --- Schedules ----------------------------------------------------------------------------------


def test_linear_warmup_and_cosine_anneal_match_formulas():
    steps = np.arange(0, 150, 7)
    warm = np.array([float(ssl_math.linear_warmup(jnp.int32(i), 0.04, 0.07, 110))
                     for i in steps])
    np.testing.assert_allclose(warm, np.where(steps < 110, 0.04 + 0.03 * steps / 110, 0.07),
                               rtol=1e-6)
    assert float(ssl_math.linear_warmup(0, 0.04, 0.07, 0)) == pytest.approx(0.07)
    cos = np.array([float(ssl_math.cosine_anneal(jnp.int32(i), 1.0, 1 / 16, 100)) for i in steps])
    ref = 1 / 16 + (1 - 1 / 16) * 0.5 * (1 + np.cos(np.pi * np.minimum(steps / 100, 1)))
    np.testing.assert_allclose(cos, ref, rtol=1e-6)
    assert float(ssl_math.cosine_anneal(5, 1.0, 0.25, 0)) == pytest.approx(0.25)


# --- Contrastive losses -------------------------------------------------------------------------


def nt_xent_numpy(z1, z2, tau):
    """Eq. (1) of Chen et al. 2020, looped over the 2N anchors."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    losses, correct = [], 0
    for i in range(2 * n):
        j = i + n if i < n else i - n
        sims = np.array([z[i] @ z[k] / tau for k in range(2 * n)])
        others = [k for k in range(2 * n) if k != i]
        denom = np.sum(np.exp(sims[others]))
        losses.append(-np.log(np.exp(sims[j]) / denom))
        correct += others[int(np.argmax(sims[others]))] == j
    return np.mean(losses), correct / (2 * n)


def info_nce_numpy(q, k, tau):
    """InfoNCE with the matching key as positive, looped over the queries."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    losses, correct = [], 0
    for i in range(len(q)):
        sims = k @ q[i] / tau
        losses.append(-(sims[i] - np.log(np.sum(np.exp(sims)))))
        correct += int(np.argmax(sims) == i)
    return np.mean(losses), correct / len(q)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_numpy(tau):
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(2, 12, 5)).astype(np.float32)
    loss, acc = ssl_math.nt_xent(jnp.asarray(z1), jnp.asarray(z2), tau)
    ref_loss, ref_acc = nt_xent_numpy(z1, z2, tau)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(acc, ref_acc)


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_info_nce_matches_numpy(tau):
    rng = np.random.default_rng(3)
    q, k = rng.normal(size=(2, 10, 6)).astype(np.float32)
    k[:5] = q[:5] + 0.1 * k[:5]  # half the pairs close: an accuracy strictly inside (0, 1)
    loss, acc = ssl_math.info_nce(jnp.asarray(q), jnp.asarray(k), tau)
    ref_loss, ref_acc = info_nce_numpy(q.astype(np.float64), k.astype(np.float64), tau)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(acc, ref_acc)
    assert 0.0 < ref_acc < 1.0


@pytest.mark.parametrize("name", ["nt_xent", "info_nce"])
def test_contrastive_loss_sharded_uses_global_negatives(name):
    """On 8 devices each shard's rows see the whole global batch: same loss and gradient as on
    one device, and as the NumPy reference."""
    fn = getattr(ssl_math, name)
    reference = {"nt_xent": nt_xent_numpy, "info_nce": info_nce_numpy}[name]
    mesh = parallel.make_mesh()
    assert mesh.size == 8
    rng = np.random.default_rng(1)
    z1, z2 = (jnp.asarray(a) for a in rng.normal(size=(2, 16, 6)).astype(np.float32))
    sharded = jax.device_put((z1, z2), parallel.batch_sharding(mesh))

    def loss_fn(mesh_or_none):
        return lambda a, b: fn(a, b, 0.2, mesh_or_none)[0]

    l1, g1 = jax.value_and_grad(loss_fn(None), argnums=(0, 1))(z1, z2)
    l8, g8 = jax.jit(jax.value_and_grad(loss_fn(mesh), argnums=(0, 1)))(*sharded)
    np.testing.assert_allclose(l8, l1, rtol=1e-6)
    for a, b in zip(g8, g1, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(l1, reference(np.asarray(z1, np.float64),
                                             np.asarray(z2, np.float64), 0.2)[0], rtol=1e-5)


# --- Patches and indicators ---------------------------------------------------------------------


def test_patchify_layout_and_round_trip():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 8, 12, 3)).astype(np.float32)
    patches = np.asarray(ssl_math.patchify(jnp.asarray(images), 4))
    assert patches.shape == (2, 6, 48)
    # Patch (row 1, col 2) is pixels [4:8, 8:12], row-major, channels last (MAE's 'nhwpqc').
    np.testing.assert_array_equal(patches[:, 1 * 3 + 2], images[:, 4:8, 8:12].reshape(2, 48))
    back = ssl_math.unpatchify(jnp.asarray(patches), 4, (2, 3))
    np.testing.assert_array_equal(np.asarray(back), images)
    with pytest.raises(ValueError, match="not divisible"):
        ssl_math.patchify(jnp.asarray(images), 5)


def test_feature_std_matches_numpy_and_detects_collapse():
    feats = np.random.default_rng(4).normal(size=(64, 16)).astype(np.float32)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    np.testing.assert_allclose(ssl_math.feature_std(jnp.asarray(feats)), unit.std(0).mean(),
                               rtol=1e-5)
    collapsed = np.tile(feats[:1], (64, 1))
    assert float(ssl_math.feature_std(jnp.asarray(collapsed))) < 1e-6


# --- MoCo v2's dictionary and grouped BatchNorm ------------------------------------------------


def moco_algorithm1_numpy(q, k, queue, tau):
    """Algorithm 1 of MoCo (He et al. 2020), with queue rows as the dictionary's keys."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    l_pos = np.einsum("nc,nc->n", q, k)[:, None]  # bmm(q.view(N,1,C), k.view(N,C,1))
    l_neg = q @ queue.T  # mm(q.view(N,C), queue.view(C,K))
    logits = np.concatenate([l_pos, l_neg], axis=1) / tau
    logits = logits - logits.max(axis=1, keepdims=True)
    log_prob = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_prob[:, 0].mean(), np.mean(np.argmax(logits, axis=1) == 0)


@pytest.mark.parametrize("tau", [0.07, 0.2])
def test_queue_info_nce_matches_moco_algorithm1(tau):
    rng = np.random.default_rng(3)
    q, k = rng.normal(size=(2, 6, 5)).astype(np.float32)
    queue = rng.normal(size=(12, 5)).astype(np.float32)
    queue /= np.linalg.norm(queue, axis=1, keepdims=True)
    loss, acc = ssl_math.queue_info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue), tau)
    ref_loss, ref_acc = moco_algorithm1_numpy(q, k, queue, tau)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(acc, ref_acc)
    # The gradient reaches the queries only: not the keys, not the queue.
    grads = jax.grad(lambda q_, k_, d_: ssl_math.queue_info_nce(q_, k_, d_, tau)[0],
                     argnums=(0, 1, 2))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue))
    assert float(jnp.abs(grads[0]).max()) > 0
    assert float(jnp.abs(grads[1]).max()) == 0 and float(jnp.abs(grads[2]).max()) == 0


def test_enqueue_order_and_wrap_around():
    """MoCo's _dequeue_and_enqueue: keys land in rows ptr..ptr+n in their order, the pointer
    wraps to 0 after K / n steps, and the oldest keys are overwritten first."""
    size, n, dim = 6, 2, 3
    queue, ptr = jnp.zeros((size, dim)), jnp.zeros((), jnp.int32)
    batches = [(np.full((n, dim), i) + np.arange(n)[:, None] / 10).astype(np.float32)
               for i in range(1, 5)]
    ref = np.zeros((size, dim), np.float32)
    ref_ptr = 0
    for keys in batches:
        queue, ptr = ssl_math.enqueue(queue, ptr, jnp.asarray(keys))
        ref[ref_ptr:ref_ptr + n] = keys  # the official code's queue[:, ptr:ptr + batch] = keys.T
        ref_ptr = (ref_ptr + n) % size
        np.testing.assert_array_equal(queue, ref)
        assert int(ptr) == ref_ptr
    assert int(ptr) == 2  # 4 batches of 2 in a queue of 6: wrapped once
    np.testing.assert_array_equal(queue[:2], batches[3])  # the oldest (batch 1) overwritten
    with pytest.raises(ValueError, match="not a multiple"):
        ssl_math.enqueue(jnp.zeros((5, dim)), ptr, jnp.zeros((2, dim)))


def test_apply_network_in_groups_normalises_each_group_alone():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(8, 4)), jnp.float32)
    net = _BNNet()
    params, state = ssl_math.split_variables(net.init(jax.random.key(0), x, train=False))
    out, new_state = ssl_math.apply_network_in_groups(net, params, state, x, 2, train=True)
    parts = [ssl_math.apply_network(net, params, state, x[i:i + 4], train=True)
             for i in (0, 4)]
    np.testing.assert_allclose(out, np.concatenate([p[0] for p in parts]), rtol=1e-5, atol=1e-6)
    mean = (parts[0][1]["batch_stats"]["BatchNorm_0"]["mean"]
            + parts[1][1]["batch_stats"]["BatchNorm_0"]["mean"]) / 2
    np.testing.assert_allclose(new_state["batch_stats"]["BatchNorm_0"]["mean"], mean, rtol=1e-5)
    whole, _ = ssl_math.apply_network(net, params, state, x, train=True)
    assert not np.allclose(out, whole, atol=1e-3)  # per-group statistics differ from global
    same, _ = ssl_math.apply_network_in_groups(net, params, state, x, 1, train=True)
    np.testing.assert_array_equal(same, whole)

"""DINO: the loss against a NumPy transcription of the paper's pseudocode, the global-batch
centre (1 device vs 8 forced CPU devices), schedules and EMA against their formulas, a teacher that
no gradient or optimizer reaches, multi-crop shapes, exact resume, bad input, the head, the ViT's
attention weights and the attention picture."""

import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from configs import dino as dino_config
from ssl_jax import methods, parallel, train
from ssl_jax.config import ConfigError
from ssl_jax.data import multicrop
from ssl_jax.evaluate import pictures
from ssl_jax.methods import dino
from ssl_jax.methods.dino import DINOHead
from ssl_jax.models.vit import Attention, vit
from ssl_jax.step import build_state


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def dino_loss_numpy(student_out, teacher_out, center, tps, tpt):
    """DINOLoss.forward of the paper's code: outputs chunked by view, loops over view pairs."""
    student = [s / tps for s in student_out]  # list over views of [batch, K]
    teacher = [_softmax((t - center) / tpt) for t in teacher_out]
    total, terms = 0.0, 0
    for iq, q in enumerate(teacher):
        for v in range(len(student)):
            if v == iq:
                continue
            log_p = np.log(_softmax(student[v]))
            total += np.mean(np.sum(-q * log_p, axis=-1))
            terms += 1
    return total / terms


# The digits preset's default backbone is a ResNet; the method's tests run a tiny ViT with local
# crops, which exercises every path (multi-crop, position-embedding interpolation, attention).
VIT_RUNLOCAL = "data=digits,model=vit_ti4,local_crops=2,runlocal"


def _light_config(**run):
    """The runlocal config with crop-and-flip views only: the method's maths at a fraction of the
    compile time of DINO's full augmentations (those are covered by test_multicrop_*)."""
    config = dino_config.get_config(VIT_RUNLOCAL)
    with config.unlocked():
        for view in (config.aug.view1, config.aug.view2, config.aug.local):
            view.update(color_jitter=0.0, brightness=None, contrast=None, saturation=None,
                        hue=None, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
        config.update(run)
    return config


def _random_outputs(batch=6, views_s=5, views_t=2, k=7, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(batch, views_s, k)) * 3
    t = rng.normal(size=(batch, views_t, k)) * 3
    c = rng.normal(size=(k,))
    return s, t, c


@pytest.mark.parametrize("views_s", [2, 5])
def test_loss_matches_numpy_pseudocode(views_s):
    s, t, c = _random_outputs(views_s=views_s)
    loss, metrics = dino.dino_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                                   jnp.asarray(c, jnp.float32), 0.1, 0.04)
    ref = dino_loss_numpy(list(s.transpose(1, 0, 2)), list(t.transpose(1, 0, 2)), c, 0.1, 0.04)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    if views_s == 2:  # Algorithm 1: loss = H(t1, s2) / 2 + H(t2, s1) / 2
        def h(tv, sv):
            return np.mean(-np.sum(_softmax((tv - c) / 0.04) * np.log(_softmax(sv / 0.1)), -1))
        alg1 = h(t[:, 0], s[:, 1]) / 2 + h(t[:, 1], s[:, 0]) / 2
        np.testing.assert_allclose(loss, alg1, rtol=1e-5)
    pt = _softmax((t - c) / 0.04)
    entropy = -np.sum(pt * np.log(pt), axis=-1)
    np.testing.assert_allclose(metrics["teacher_entropy"], entropy.mean(), rtol=1e-5)
    # KL(P_t || P_s) averaged over the same pairs: the loss minus the teacher entropies.
    pairs = [(i, v) for i in range(2) for v in range(views_s) if v != i]
    ps = _softmax(s / 0.1)
    kl = np.mean([np.mean(np.sum(pt[:, i] * (np.log(pt[:, i]) - np.log(ps[:, v])), -1))
                  for i, v in pairs])
    np.testing.assert_allclose(metrics["kl_teacher_student"], kl, rtol=1e-4, atol=1e-6)


def test_loss_gradient_only_through_student():
    s, t, c = (jnp.asarray(a, jnp.float32) for a in _random_outputs())
    g_teacher = jax.grad(lambda t_: dino.dino_loss(s, t_, c, 0.1, 0.04)[0])(t)
    assert float(jnp.abs(g_teacher).max()) == 0.0
    g_student = jax.grad(lambda s_: dino.dino_loss(s_, t, c, 0.1, 0.04)[0])(s)
    assert float(jnp.abs(g_student).max()) > 0.0


def test_schedules_match_formulas():
    config = dino_config.get_config("data=digits")
    with config.unlocked():
        config.dino.update(warmup_teacher_temp=0.04, teacher_temp=0.07,
                           warmup_teacher_temp_epochs=10.0, momentum_teacher=0.99)
    method = methods.create(config, None, total_steps=330, steps_per_epoch=11)
    assert method.warmup_steps == 110  # 10 epochs of 11 steps
    steps = np.arange(0, 400, 7)
    temps = np.array([float(method.teacher_temperature(jnp.int32(i))) for i in steps])
    expected = np.where(steps < 110, 0.04 + (0.07 - 0.04) * steps / 110, 0.07)
    np.testing.assert_allclose(temps, expected, rtol=1e-6)
    # DINO's cosine_scheduler(0.99, 1, ...): 1 + (0.99 - 1) * (1 + cos(pi * i / N)) / 2.
    moms = np.array([float(method.teacher_momentum(jnp.int32(i))) for i in steps])
    ref = 1 + 0.5 * (0.99 - 1) * (1 + np.cos(np.pi * np.minimum(steps, 330) / 330))
    np.testing.assert_allclose(moms, ref, rtol=1e-6)
    assert moms[0] == pytest.approx(0.99) and moms[-1] == pytest.approx(1.0)


def test_ema_update():
    config = dino_config.get_config(VIT_RUNLOCAL)
    method = methods.create(config, None, total_steps=10, steps_per_epoch=5)
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.ones(2)}
    teacher = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.zeros(2)}
    extra = {"teacher": teacher, "teacher_state": {}, "state": {}, "center": jnp.zeros(3)}
    out = method.after_update(params, extra, jnp.int32(4))
    m = 1 + 0.5 * (config.dino.momentum_teacher - 1) * (1 + np.cos(np.pi * 4 / 10))
    np.testing.assert_allclose(out["teacher"]["a"], m * teacher["a"] + (1 - m) * params["a"],
                               rtol=1e-6)
    np.testing.assert_allclose(out["teacher"]["b"], (1 - m) * np.ones(2), rtol=1e-5)
    assert out["center"] is extra["center"]


def _batch(n=16, size=16, seed=2):
    images = np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3))
    return {"image": jnp.asarray(images, jnp.uint8), "label": jnp.zeros((n,), jnp.int32)}


def test_multicrop_shapes_and_views():
    """DINO's full views on 8 devices: shapes, independent crops, crops stay with their image."""
    config = dino_config.get_config("data=cifar10")
    aug = config.aug
    mesh = parallel.make_mesh()
    images = jax.device_put(_batch()["image"], parallel.batch_sharding(mesh))
    crop = jax.jit(lambda x: multicrop.multi_crop(
        jax.random.key(0), x, (aug.view1, aug.view2), 2, aug.local, 4))
    g, loc = crop(images)
    assert g.shape == (16, 2, 32, 32, 3) and loc.shape == (16, 4, 16, 16, 3)
    assert not np.allclose(loc[:, 0], loc[:, 1])  # independent draws per crop
    assert not np.allclose(g[:, 0], g[:, 1])
    # Each device holds the crops of its own 2 images.
    assert {s.data.shape[0] for s in loc.addressable_shards} == {2}
    flat = multicrop.flatten_views(loc)
    assert flat.shape == (64, 16, 16, 3)
    np.testing.assert_array_equal(flat[4:8], loc[1])  # image 1's crops in rows 4..7
    with pytest.raises(ValueError, match="at least one global crop"):
        multicrop.multi_crop(jax.random.key(0), images, (aug.view1,), 0)


def _one_step(num_devices):
    """Loss, gradients (of params and of extra), new centre and metrics of one DINO step on
    `num_devices` devices."""
    config = _light_config()
    mesh = parallel.make_mesh(devices=jax.devices()[:num_devices])
    method = methods.create(config, mesh)
    batch = _batch()
    params, extra = method.init(jax.random.key(0), batch)
    # A centre that is not zero and a teacher unlike the student, so both matter.
    extra["center"] = jnp.linspace(-1.0, 1.0, config.dino.out_dim)
    extra["teacher"] = jax.tree_util.tree_map(lambda x: x * 1.1, extra["teacher"])
    batch = jax.device_put(batch, parallel.batch_sharding(mesh))

    @jax.jit
    def step(params, extra, batch):
        grad_fn = jax.value_and_grad(method.loss, argnums=(0, 1), has_aux=True)
        (loss, (metrics, new_extra)), grads = grad_fn(params, extra, batch, jax.random.key(3), 0)
        return loss, grads, new_extra, metrics

    return jax.device_get(step(params, extra, batch))


def test_step_same_on_1_and_8_devices():
    loss1, (grads1, extra_grads1), extra1, metrics1 = _one_step(1)
    loss8, (grads8, extra_grads8), extra8, metrics8 = _one_step(8)
    assert np.isfinite(loss1)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    # The centre is the mean over the global batch on both.
    np.testing.assert_allclose(extra8["center"], extra1["center"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(extra1["center"], np.linspace(-1.0, 1.0, len(extra1["center"])))
    flat1, flat8 = jax.tree_util.tree_leaves(grads1), jax.tree_util.tree_leaves(grads8)
    scale = max(float(np.max(np.abs(g))) for g in flat1)
    for a, b in zip(flat8, flat1, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
    for key in ("teacher_entropy", "kl_teacher_student", "center_norm"):
        np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=1e-5)
    # No gradient reaches the teacher or the centre.
    for extra_grads in (extra_grads1, extra_grads8):
        assert all(float(np.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(extra_grads))


def test_teacher_lives_outside_params_and_optimizer():
    config = _light_config()
    mesh = parallel.make_mesh()
    method = methods.create(config, mesh, total_steps=6, steps_per_epoch=89)
    state = build_state(config, mesh, method, total_steps=6, steps_per_epoch=89).abstract
    assert set(state["params"]) == {"encoder", "head"}
    assert set(state["extra"]) == {"state", "teacher", "teacher_state", "center"}
    chex.assert_trees_all_equal_shapes(state["extra"]["teacher"], state["params"])
    # The optimizer holds two moments per trained parameter and nothing of the teacher.
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
    moments = sum(x.size for x in jax.tree_util.tree_leaves(state["opt_state"]) if x.ndim)
    assert moments == 2 * n_params


def test_resnet_teacher_keeps_its_own_batchnorm_statistics():
    """With BatchNorm (a ResNet backbone) the teacher normalises with batch statistics and
    updates its own running statistics, which evaluation restores; the EMA moves only its
    parameters."""
    config = _light_config()
    with config.unlocked():
        config.model = {"name": "resnet18", "width_multiplier": 0.125, "cifar_stem": True}
    method = methods.create(config, None)
    params, extra = method.init(jax.random.key(0), _batch())
    loss, (_, new_extra) = jax.jit(method.loss)(params, extra, _batch(), jax.random.key(1), 0)
    assert np.isfinite(loss)
    stats = new_extra["teacher_state"]["encoder"]["batch_stats"]
    before = extra["teacher_state"]["encoder"]["batch_stats"]
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), stats, before)
    assert max(jax.tree_util.tree_leaves(moved)) > 0
    after = method.after_update(params, new_extra, jnp.int32(0))
    chex.assert_trees_all_equal(after["teacher_state"], new_extra["teacher_state"])
    assert method.encoder_variables(params, after)["batch_stats"] is stats


@pytest.fixture(scope="module")
def dino_runs(tmp_path_factory):
    """A 3-step run, and a copy of its step-1 checkpoint resumed to step 3: ``(full, resumed,
    full_dir)``."""
    config = _light_config(total_steps=3)
    with config.unlocked():
        config.checkpoint.every_steps = 1
    root = tmp_path_factory.mktemp("dino_runs")
    full = train.train(config, str(root / "full"))
    (root / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(root / "full" / "config.json", root / "resumed" / "config.json")
    shutil.copytree(root / "full" / "checkpoints" / "1", root / "resumed" / "checkpoints" / "1")
    resumed = train.train(config, str(root / "resumed"))
    return jax.device_get(full), jax.device_get(resumed), root / "full"


def test_resume_restores_teacher_and_center_exactly(dino_runs):
    full, resumed, full_dir = dino_runs
    assert int(resumed["step"]) == 3 and int(resumed["nonfinite_steps"]) == 0
    chex.assert_trees_all_equal(full["extra"], resumed["extra"])
    chex.assert_trees_all_equal(full["params"], resumed["params"])
    assert float(np.linalg.norm(full["extra"]["center"])) > 0
    # The teacher moved towards the student but is not the student.
    diff = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                  full["extra"]["teacher"], full["params"])
    assert max(jax.tree_util.tree_leaves(diff)) > 0
    rows = (full_dir / "metrics.jsonl").read_text()
    for key in ("teacher_entropy", "kl_teacher_student", "center_norm"):
        assert key in rows


def _bad(config_arg, key, value):
    config = dino_config.get_config(config_arg)
    with config.unlocked():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.mark.parametrize("key,value,match", [
    ("aug.local.size", 6, "aug.local.size"),
    ("aug.view1.size", 18, "aug.view1.size"),
    ("aug.num_global_crops", 0, "aug.num_global_crops"),
    ("dino.out_dim", 1, "dino.out_dim"),
])
def test_bad_config_named_before_compile(key, value, match):
    config = _bad(VIT_RUNLOCAL, key, value)
    with pytest.raises(ConfigError, match=match):
        methods.create(config, parallel.make_mesh(), total_steps=6, steps_per_epoch=89)


def test_teacher_temperature_warmup_longer_than_run(tmp_path):
    config = _bad(VIT_RUNLOCAL, "dino.warmup_teacher_temp_epochs", 1.0)  # 6 of 89 steps
    with pytest.raises(ConfigError, match="dino.warmup_teacher_temp_epochs.*longer than the run"):
        train.train(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    methods.create(config, parallel.make_mesh())  # an evaluation (run length unknown) is fine


def test_dino_head_weight_norm_matches_numpy():
    x = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    for fixed in (True, False):
        head = DINOHead(out_dim=7, hidden_dim=16, bottleneck_dim=5, norm_last_layer=fixed)
        variables = head.init(jax.random.key(0), x, train=False)
        p = jax.tree_util.tree_map(np.asarray, variables["params"])
        assert ("gain" in p["last_layer"]) is not fixed
        if not fixed:
            p["last_layer"]["gain"] = np.linspace(0.5, 2.0, 7).astype(np.float32)
        out = head.apply({"params": p}, x, train=False)
        h = x
        for i in range(2):
            h = h @ p[f"dense{i}"]["kernel"] + p[f"dense{i}"]["bias"]
            h = np.asarray(jax.nn.gelu(h, approximate=False))
        h = h @ p["dense2"]["kernel"] + p["dense2"]["bias"]
        h = h / np.linalg.norm(h, axis=-1, keepdims=True)
        v = p["last_layer"]["kernel_v"]
        w = v / np.linalg.norm(v, axis=0, keepdims=True)
        if not fixed:
            w = w * p["last_layer"]["gain"]
        np.testing.assert_allclose(out, h @ w, rtol=1e-4, atol=1e-6)


def test_vit_attention_weights_match_numpy():
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
    attn = Attention(dim=8, num_heads=2)
    variables = attn.init(jax.random.key(0), x)
    weights = np.asarray(attn.apply(variables, x, return_weights=True))
    assert weights.shape == (2, 2, 5, 5)
    qkv = x @ np.asarray(variables["params"]["qkv"]["kernel"]) + np.asarray(
        variables["params"]["qkv"]["bias"])
    qkv = qkv.reshape(2, 5, 3, 2, 4)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    ref = _softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0)
    np.testing.assert_allclose(weights, ref, rtol=1e-4, atol=1e-6)
    # The normal path (dot_product_attention) is these weights applied to v, then projected.
    mixed = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 5, 8)
    proj = variables["params"]["proj"]
    np.testing.assert_allclose(attn.apply(variables, x), mixed @ np.asarray(proj["kernel"]) +
                               np.asarray(proj["bias"]), rtol=1e-4, atol=1e-5)
    model = vit("ti", 4, image_size=16, depth=2, dim=16, num_heads=2)
    images = jnp.zeros((3, 16, 16, 3))
    mv = model.init(jax.random.key(0), images, train=False)
    w = model.apply(mv, images, train=False, return_attention=True)
    assert w.shape == (3, 2, 17, 17)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)


def test_attention_picture(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 16, 16, 3)).astype(np.uint8)
    maps = rng.random(size=(2, 3, 4, 4))
    maps[0, 0] = 0.0
    maps[0, 0, 1, 2] = 1.0  # one hot patch
    picture = pictures.attention_figure(images, maps, tile=32)
    assert picture.size == (4 * 32 + 3 * pictures.GAP, 2 * 32 + pictures.GAP)
    pixels = np.asarray(picture)
    tile = pixels[:32, 32 + pictures.GAP:64 + pictures.GAP]
    np.testing.assert_array_equal(tile[8:16, 16:24], np.broadcast_to(
        pictures.colorize(np.ones((1, 1)))[0, 0], (8, 8, 3)))  # the hot patch is brightest
    np.testing.assert_array_equal(tile[0, 0], pictures.colorize(np.zeros((1, 1)))[0, 0])
    path = tmp_path / "a.png"
    picture.save(path)
    assert Image.open(path).size == picture.size


def test_evaluation_uses_teacher_and_writes_attention_picture(dino_runs):
    from ssl_jax.evaluate import __main__ as evaluate_job
    from ssl_jax.evaluate import features

    full, _, workdir = dino_runs
    config = _light_config(total_steps=3)
    _, variables, step = features.restore_encoder(workdir, config, parallel.make_mesh())
    assert step == 3
    chex.assert_trees_all_equal(jax.device_get(variables["params"]),
                                full["extra"]["teacher"]["encoder"])
    results = evaluate_job.evaluate(str(workdir), ["eval.random_init_baseline=false",
                                                   "eval.probe_epochs=2"])
    assert results["method"] == "dino" and results["ssl"]["knn_top1"] > 0.2  # chance: 0.1
    picture = Image.open(workdir / "attention_step3.png")
    heads = 3  # vit_ti: 3 heads
    assert picture.size == ((heads + 1) * pictures.TILE + heads * pictures.GAP,
                            4 * pictures.TILE + 3 * pictures.GAP)
    assert results["attention_picture"].endswith("attention_step3.png")


def test_last_layer_frozen_for_first_epoch():
    """``optim.freeze`` on DINO's last layer: no update at all (no step, no weight decay) during
    the first epoch, then updates."""
    config = _light_config()
    with config.unlocked():
        config.optim.freeze = (("head/last_layer", 1.0),)
    mesh = parallel.make_mesh()
    method = methods.create(config, mesh, total_steps=6, steps_per_epoch=2)
    setup = build_state(config, mesh, method, total_steps=6, steps_per_epoch=2)
    params = jax.tree_util.tree_map(lambda a: jnp.full(a.shape, 0.5, a.dtype),
                                    setup.abstract["params"])
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    opt_state = setup.tx.init(params)
    update = jax.jit(setup.tx.update)
    for step in range(3):
        updates, opt_state = update(grads, opt_state, params)
        frozen = float(jnp.abs(updates["head"]["last_layer"]["kernel_v"]).max())
        other = float(jnp.abs(updates["head"]["dense0"]["kernel"]).max())
        assert other > 0
        assert (frozen == 0.0) == (step < 2), step  # frozen for 1 epoch = 2 steps
        params = optax.apply_updates(params, updates)

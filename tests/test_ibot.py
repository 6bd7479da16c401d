"""iBOT: the loss (cls and patch terms, weights, both centres) against a NumPy transcription of the
official ``iBOTLoss``, shared and separate heads, masks (half of the global crops, blocks within
the ratio range), masked patches of the student that do not see their pixels, the patch centre as
the global-batch mean (1 device vs 8 forced CPU devices), a resumed run that restores both
centres and the teacher, bad input (exit code 2), and the evaluation (teacher, attention maps)
and fine-tuning jobs on an iBOT run."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import ibot as ibot_config
from ssl_jax import finetune, methods, parallel
from ssl_jax.config import ConfigError
from tests.method_steps import (
    assert_train_refuses,
    plain_views,
    record_calls,
    run_and_resume,
    set_key,
    step_on_1_and_8_devices,
)

RUNLOCAL = "data=digits,runlocal"  # 16-px global and 8-px local crops, 2-block ViT-Ti/4 (4x4)


def _config(local_crops=2, **changes):
    """The runlocal config with crop-and-flip views only (a fraction of the compile time)."""
    config = plain_views(ibot_config.get_config(RUNLOCAL))
    with config.unlocked():
        config.aug.local.update(color_jitter=0.0, brightness=None, contrast=None,
                                saturation=None, hue=None)
        config.aug.num_local_crops = local_crops  # the student's local cls tokens take part
        for key, value in changes.items():
            set_key(config, key, value)
    return config


def _images(n=16, seed=2):
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def ibot_loss_numpy(student_cls, student_patch, teacher_cls, teacher_patch, student_local_cls,
                    masks, center, center2, student_temp, temp, temp2, lambda1, lambda2,
                    momentum=0.9, momentum2=0.9):
    """iBOTLoss.forward and update_center of the official main_ibot.py, outputs chunked by view
    (lists over views of ``[batch, K]`` and ``[batch, N, K']``, ``masks`` of ``[batch, N]``)."""
    s_cls = [s / student_temp for s in student_cls + student_local_cls]
    s_patch = [s / student_temp for s in student_patch]
    t_cls = [_softmax((t - center) / temp) for t in teacher_cls]
    t_patch = [_softmax((t - center2) / temp2) for t in teacher_patch]
    total1 = n1 = total2 = n2 = 0
    for q in range(len(t_cls)):
        for v in range(len(s_cls)):
            if v == q:
                loss2 = np.sum(-t_patch[q] * _log_softmax(s_patch[v]), axis=-1)
                mask = masks[v].astype(np.float64)
                loss2 = np.sum(loss2 * mask, axis=-1) / np.clip(mask.sum(-1), 1.0, None)
                total2, n2 = total2 + loss2.mean(), n2 + 1
            else:
                loss1 = np.sum(-t_cls[q] * _log_softmax(s_cls[v]), axis=-1)
                total1, n1 = total1 + loss1.mean(), n1 + 1
    cls_center = np.concatenate(teacher_cls).mean(0)
    patch_center = np.concatenate(teacher_patch).mean(1).mean(0)
    return (total1 / n1 * lambda1, total2 / n2 * lambda2,
            center * momentum + cls_center * (1 - momentum),
            center2 * momentum2 + patch_center * (1 - momentum2))


def test_loss_matches_the_official_ibot_loss():
    """With separate last layers (K=64 cls outputs, K'=48 patch outputs): the shared head is
    the same maths with K' = K (its step runs in the 1-vs-8-device test)."""
    shared_head = False
    config = _config(**{"ibot.shared_head": shared_head, "ibot.patch_out_dim": 48,
                        "ibot.head_bn": False,  # the student's head on the masked patches
                        "ibot.cls_loss_weight": 0.7, "ibot.patch_loss_weight": 1.3,
                        "ibot.teacher_patch_temp": 0.06, "ibot.student_temp": 0.2})
    method = methods.create(config, None, total_steps=6, steps_per_epoch=3)
    params, extra = method.init(jax.random.key(0), {"image": jnp.asarray(_images())})
    k, kp = (64, 64) if shared_head else (64, 48)
    assert ("last_layer2" in params["head"]) is not shared_head
    rng = np.random.default_rng(0)
    extra["center"] = jnp.asarray(rng.normal(size=k), jnp.float32)
    extra["patch_center"] = jnp.asarray(rng.normal(size=kp), jnp.float32)
    extra["teacher"] = jax.tree_util.tree_map(lambda x: x * 1.1, extra["teacher"])
    outs = record_calls(method, "tokens_out")
    local = record_calls(method, "local_cls_out")
    masks = record_calls(method, "masks")
    kept = record_calls(method, "masked_first")

    @jax.jit
    def run(params, extra, images):  # the recorded networks' outputs leave the same trace
        loss, (metrics, new) = method.loss(params, extra, {"image": images}, jax.random.key(1), 0)
        return loss, metrics, new, outs[0][0], outs[1][0], local[0][0], masks[0], kept[0]

    loss, metrics, new, student, teacher, local_cls, mask, keep = run(params, extra,
                                                                     jnp.asarray(_images()))
    (s_cls, s_patch), (t_cls, t_patch), mask = student, teacher, np.asarray(mask)
    # The student's head saw floor(0.5 * 16) = 8 patches per crop, every masked one among them:
    # back on the 4x4 grid (the others are not read by the loss).
    assert s_patch.shape == (16, 2, 8, kp) and local_cls.shape == (16, 2, k)
    assert np.array_equal(np.take_along_axis(mask, np.asarray(keep), 2).sum(-1), mask.sum(-1))
    on_grid = np.zeros((16, 2, 16, kp))
    np.put_along_axis(on_grid, np.asarray(keep)[..., None], np.asarray(s_patch), 2)
    s_patch = on_grid
    crops_masked = mask.any(-1)
    assert crops_masked.any() and not crops_masked.all()  # some crops unmasked (mask_prob 0.5)
    views = lambda a, n: [np.asarray(a[:, i], np.float64) for i in range(n)]
    ref_cls, ref_patch, ref_c, ref_c2 = ibot_loss_numpy(
        views(s_cls, 2), views(s_patch, 2), views(t_cls, 2), views(t_patch, 2),
        views(local_cls, 2), [mask[:, i] for i in range(2)], np.asarray(extra["center"]),
        np.asarray(extra["patch_center"]), 0.2, 0.04, 0.06, 0.7, 1.3)
    np.testing.assert_allclose(0.7 * metrics["cls_loss"], ref_cls, rtol=1e-5)
    np.testing.assert_allclose(1.3 * metrics["patch_loss"], ref_patch, rtol=1e-5)
    np.testing.assert_allclose(loss, ref_cls + ref_patch, rtol=1e-5)
    np.testing.assert_allclose(new["center"], ref_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["patch_center"], ref_c2, rtol=1e-5, atol=1e-6)


def test_the_student_head_on_the_masked_patches_alone_changes_no_loss_or_gradient():
    """The student's head sees floor(hi * N) patches per crop, the masked ones first: the loss,
    its gradients and the new centres equal those of the head on all N patches (which a head
    with BatchNorm keeps, its statistics spanning every token)."""
    method = methods.create(_config(**{"ibot.head_bn": False}), None, total_steps=6,
                            steps_per_epoch=3)
    assert method.patch_budget == 8  # floor(0.5 * 16) on the 4x4 grid
    params, extra = method.init(jax.random.key(0), {"image": jnp.asarray(_images())})
    images = jnp.asarray(_images())

    def loss_and_grads(budget):
        method.patch_budget = budget
        fn = jax.value_and_grad(lambda p: method.loss(p, extra, {"image": images},
                                                      jax.random.key(1), 0), has_aux=True)
        return jax.jit(fn)(params)

    (gathered, (_, new)), grads = loss_and_grads(8)
    (every, (_, new_all)), grads_all = loss_and_grads(16)
    np.testing.assert_allclose(gathered, every, rtol=1e-5)
    chex.assert_trees_all_close(grads, grads_all, rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(new["patch_center"], new_all["patch_center"], rtol=1e-5)
    assert float(optax.tree.norm(grads["head"])) > 0
    assert methods.create(_config(), None).patch_budget == 16  # digits' head has BatchNorm


def test_masks_cover_half_of_the_global_crops_in_blocks_within_the_ratio():
    method = methods.create(_config(), None)
    masks = np.asarray(jax.jit(lambda k: method.masks(k, 256))(jax.random.key(0)))
    assert masks.shape == (256, 2, 16)
    counts = masks.sum(-1)
    assert abs((counts > 0).mean() - 0.5) < 0.08  # mask_prob 0.5, per crop
    assert counts.max() <= 0.5 * 16  # at most hi * N: blocks never overshoot the target
    assert counts[counts > 0].mean() > 0.1 * 16
    # The 14x14 grid of the ImageNet preset: blocks of >= 16 patches, no isolated patch.
    big = methods.create(ibot_config.get_config("data=imagenet2012"), None)
    big_masks = np.asarray(jax.jit(lambda k: big.masks(k, 8))(jax.random.key(1)))
    grids = big_masks.reshape(-1, 14, 14)
    padded = np.pad(grids, ((0, 0), (1, 1), (1, 1)))
    neighbours = (padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2]
                  | padded[:, 1:-1, 2:])
    assert not np.any(grids & ~neighbours) and grids.reshape(16, -1).sum(-1).max() <= 0.5 * 196


def test_masked_patches_of_the_student_do_not_see_their_pixels():
    method = methods.create(_config(), None)
    params, extra = method.init(jax.random.key(0), {"image": jnp.asarray(_images(2))})
    crops = jax.random.normal(jax.random.key(1), (2, 2, 16, 16, 3))
    mask = jnp.zeros((2, 2, 16), bool).at[:, :, :6].set(True)  # rows 0-1 partly masked
    pixel_mask = np.asarray(mask).reshape(2, 2, 4, 4).repeat(4, 2).repeat(4, 3)[..., None]
    student = jax.jit(lambda x: method.tokens_out(
        method.encoder, params, extra["state"], x, method.student_forward(jax.random.key(2)),
        mask)[0])
    teacher = jax.jit(lambda x: method.tokens_out(
        method.teacher_encoder, extra["teacher"], extra["teacher_state"], x,
        method.teacher_forward())[0])
    noisy = crops + 5.0 * pixel_mask
    for a, b in zip(student(noisy), student(crops), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(teacher(noisy), teacher(crops),
                                                            strict=True)]
    assert min(moved) > 1e-4  # the teacher sees the unmasked crops


def test_patch_centre_is_the_global_batch_mean_on_1_and_8_devices():
    results = step_on_1_and_8_devices(_config(local_crops=0), _images(),
                                      stat_keys=("state", "teacher_state"))
    (_, _, m1, extra1, _), (_, _, m8, extra8, _) = results
    for key in ("center", "patch_center"):
        np.testing.assert_allclose(extra8[key], extra1[key], rtol=1e-5, atol=1e-6)
        assert float(np.abs(extra1[key]).max()) > 0  # moved from zero
    for key in ("cls_loss", "patch_loss", "mask_ratio"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5)


def test_resume_evaluation_and_finetuning(tmp_path):
    """A resumed run restores both centres and the teacher exactly; the evaluation job restores
    the teacher's backbone (kNN, linear, attention maps) and the fine-tuning job takes the run."""
    from ssl_jax.evaluate import __main__ as evaluate_job
    from ssl_jax.evaluate import features

    config = _config(local_crops=0, total_steps=3, **{"checkpoint.every_steps": 1})
    full, resumed = run_and_resume(config, tmp_path)
    workdir = tmp_path / "full"
    assert int(resumed["step"]) == 3 and int(resumed["nonfinite_steps"]) == 0
    assert set(full["extra"]) == {"state", "teacher", "teacher_state", "center", "patch_center"}
    chex.assert_trees_all_equal(full["extra"], resumed["extra"])
    chex.assert_trees_all_equal(full["params"], resumed["params"])
    diff = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                  full["extra"]["teacher"], full["params"])
    assert max(jax.tree_util.tree_leaves(diff)) > 0  # the teacher is an EMA, not the student
    _, variables, _ = features.restore_encoder(workdir, config, parallel.make_mesh())
    chex.assert_trees_all_equal(jax.device_get(variables["params"]),
                                full["extra"]["teacher"]["encoder"])
    results = evaluate_job.evaluate(str(workdir), ["eval.random_init_baseline=false",
                                                   "eval.probe_epochs=2"])
    assert results["method"] == "ibot" and np.isfinite(results["ssl"]["knn_top1"])
    assert results["attention_picture"].endswith("attention_step3.png")
    out = finetune.finetune(str(workdir), "configs/finetune.py:data=digits,runlocal")
    assert out["init"] == "pretrained" and 0.0 <= out["test_top1"] <= 1.0


@pytest.mark.parametrize("key,value,match", [
    ("ibot.patch_loss_weight", -0.5, r"config\.ibot\.patch_loss_weight: -0\.5 must be >= 0"),
    ("ibot.mask_ratio", (0.0, 0.5), r"config\.ibot\.mask_ratio"),
    ("ibot.mask_ratio", (0.1, 1.0), r"config\.ibot\.mask_ratio"),
    ("ibot.mask_prob", 1.5, r"config\.ibot\.mask_prob"),
    ("ibot.min_block_patches", 16, r"config\.ibot\.min_block_patches"),
    ("ibot.teacher_patch_temp", 0.0, r"config\.ibot\.teacher_patch_temp"),
    ("model.use_mask_token", False, r"config\.model\.use_mask_token"),
    ("ibot.out_dim", 1, r"config\.ibot\.out_dim"),
])
def test_bad_config_named_before_compile(key, value, match):
    with pytest.raises(ConfigError, match=match):
        methods.create(_config(**{key: value}), parallel.make_mesh())


def test_resnet_is_refused():
    config = _config()
    with config.unlocked():
        config.model = dict(name="resnet18", width_multiplier=0.125, cifar_stem=True)
    with pytest.raises(ConfigError, match=r"config\.model\.name: iBOT needs patch tokens"):
        methods.create(config, parallel.make_mesh())


def test_negative_patch_loss_weight_exits_2_before_compiling(tmp_path):
    assert_train_refuses(tmp_path, f"configs/ibot.py:{RUNLOCAL}",
                         "--config.ibot.patch_loss_weight=-1.0", "config.ibot.patch_loss_weight")

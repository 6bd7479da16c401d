"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Self-distillation without labels. A student network (backbone + :class:`DINOHead`) sees all
crops of an image, ``G`` global and ``L`` local (multi-crop, ``ssl_jax.data.multicrop``); a
teacher of the same architecture, an exponential moving average of the student, sees the global
crops only. With ``P = softmax(g(x) / tau)``, the loss is the cross-entropy between teacher and
student distributions summed over all pairs of different views and averaged (Algorithm 1 of the
paper, extended to multi-crop as in its code)::

    L = 1 / |pairs| * sum_{t in global} sum_{s in all views, s != t} H(P_t(x_t), P_s(x_s)),
    H(a, b) = -sum_k a_k log b_k,  P_t = softmax((g_t(x) - C) / tau_t),  P_s = softmax(g_s / tau_s)

Collapse is avoided by centring and sharpening the teacher: the centre ``C`` follows
``C <- m C + (1 - m) mean(g_t(x))`` with ``m = center_momentum`` and the mean over the teacher
outputs of the **global** batch (all devices: the step runs under ``jax.jit`` over arrays sharded
on the mesh, so the mean is global); the teacher temperature ``tau_t`` warms up linearly from
``warmup_teacher_temp`` to ``teacher_temp``. After each optimizer step the teacher follows
``theta_t <- lambda theta_t + (1 - lambda) theta_s`` with ``lambda`` on a cosine from
``momentum_teacher`` to 1 over the run.

The teacher and the centre live in ``extra``, not in the trained ``params``: no gradient and no
optimizer touches them. Evaluation uses the teacher's backbone (:meth:`DINO.encoder_variables`).
Freezing the head's last layer in the first epoch, the weight-decay cosine and per-parameter
gradient clipping are optimizer options (``config.optim.freeze``, ``weight_decay_end``,
``grad_clip_kind``; see ``ssl_jax.optim``).

Config keys: ``config.dino.{out_dim, hidden_dim, bottleneck_dim, head_layers, head_bn,
norm_last_layer, student_temp, teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs,
center_momentum, momentum_teacher}``; ``config.aug.{view1, view2}`` (global crops 1 and 2),
``config.aug.local`` (local crops), ``config.aug.{num_global_crops, num_local_crops}``.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from ssl_jax.config import require
from ssl_jax.data import multicrop
from ssl_jax.methods.base import MethodBase
from ssl_jax.models import create_encoder
from ssl_jax.models.heads import DINOHead
from ssl_jax.models.vit import ViT


def teacher_temperature(
    step: jax.Array, warmup_temp: float, final_temp: float, warmup_steps: int
) -> jax.Array:
    """``tau_t(step)``: linear from ``warmup_temp`` at step 0 to ``final_temp`` at
    ``warmup_steps``, constant after (DINO's code steps the same line once per epoch)."""
    if warmup_steps <= 0:
        return jnp.asarray(final_temp, jnp.float32)
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)
    return warmup_temp + (final_temp - warmup_temp) * frac


def teacher_momentum(step: jax.Array, base: float, total_steps: int) -> jax.Array:
    """``lambda(step) = 1 - (1 - base) (cos(pi step / T) + 1) / 2``, T the run's steps (DINO's
    ``cosine_scheduler(base, 1, ...)``): ``base`` at step 0, rising to 1 at the end."""
    t = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps) / max(total_steps, 1)
    return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * t) + 1.0) / 2.0


def ema(teacher: Any, student: Any, momentum: jax.Array) -> Any:
    """``momentum * teacher + (1 - momentum) * student``, leaf by leaf."""
    return jax.tree_util.tree_map(
        lambda t, s: (momentum * t + (1.0 - momentum) * s).astype(t.dtype), teacher, student)


def update_center(center: jax.Array, teacher_out: jax.Array, momentum: float) -> jax.Array:
    """``C <- m C + (1 - m) mean(teacher_out)``: ``center [K]``, ``teacher_out [batch, views, K]``
    (raw teacher logits of the global crops of the global batch)."""
    chex.assert_rank(teacher_out, 3)
    batch_center = jnp.mean(jax.lax.stop_gradient(teacher_out).astype(jnp.float32), axis=(0, 1))
    chex.assert_equal_shape((center, batch_center))
    return momentum * center + (1.0 - momentum) * batch_center


def dino_loss(
    student_out: jax.Array,
    teacher_out: jax.Array,
    center: jax.Array,
    student_temp: float,
    teacher_temp: jax.Array | float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The DINO cross-entropy over all pairs of different views, and collapse indicators.

    Args:
      student_out: ``[batch, V_s, K]`` student logits of all crops, global crops first.
      teacher_out: ``[batch, V_t, K]`` teacher logits of the ``V_t <= V_s`` global crops (teacher
        view ``t`` is the same crop as student view ``t``, so that pair is skipped).
      center: ``[K]``, subtracted from the teacher logits.
      student_temp, teacher_temp: tau_s and tau_t.

    Returns:
      ``(loss, metrics)``: the mean over pairs of the batch-mean ``H(P_t, P_s)``; metrics
      ``teacher_entropy`` (mean ``H(P_t)``), ``kl_teacher_student`` (mean over pairs of
      ``KL(P_t || P_s) = H(P_t, P_s) - H(P_t)``), ``teacher_batch_entropy`` (entropy of the
      batch-mean ``P_t``: near 0 when every image lands on the same dimension) and
      ``student_entropy``.
    """
    chex.assert_rank([student_out, teacher_out], 3)
    batch, views_s, k = student_out.shape
    views_t = teacher_out.shape[1]
    chex.assert_shape(teacher_out, (batch, views_t, k))
    chex.assert_shape(center, (k,))
    if views_t > views_s:
        raise ValueError(f"teacher has {views_t} views but the student only {views_s}")
    log_ps = jax.nn.log_softmax(student_out.astype(jnp.float32) / student_temp, axis=-1)
    teacher = jax.lax.stop_gradient(teacher_out).astype(jnp.float32)
    center = jax.lax.stop_gradient(center)
    log_pt = jax.nn.log_softmax((teacher - center) / teacher_temp, axis=-1)
    pt = jnp.exp(log_pt)
    cross = -jnp.einsum("btk,bsk->bts", pt, log_ps)  # [batch, V_t, V_s]
    entropy_t = -jnp.sum(pt * log_pt, axis=-1)  # [batch, V_t]
    pairs = (jnp.arange(views_t)[:, None] != jnp.arange(views_s)[None, :]).astype(jnp.float32)
    count = batch * jnp.sum(pairs)
    loss = jnp.sum(cross * pairs) / count
    kl = jnp.sum((cross - entropy_t[:, :, None]) * pairs) / count
    mean_pt = jnp.mean(pt, axis=(0, 1))
    metrics = {
        "teacher_entropy": jnp.mean(entropy_t),
        "kl_teacher_student": kl,
        "teacher_batch_entropy": -jnp.sum(mean_pt * jnp.log(jnp.maximum(mean_pt, 1e-30))),
        "student_entropy": -jnp.mean(jnp.sum(jnp.exp(log_ps) * log_ps, axis=-1)),
    }
    return loss, metrics


def _split_variables(variables: Any) -> tuple[Any, dict[str, Any]]:
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}


class DINO(MethodBase):
    """Student (params) and EMA teacher (extra) trained by self-distillation on multi-crop."""

    def __init__(
        self, config: ml_collections.ConfigDict, mesh: Mesh | None, total_steps: int = 0,
        steps_per_epoch: int = 0,
    ):
        cfg, aug = config.dino, config.aug
        self.config = config
        self.mesh = mesh
        model = dict(config.model)
        model_name = model.pop("name")
        self.encoder = create_encoder(model_name, image_size=aug.view1.size, **model)
        # The teacher has no stochastic depth (DINO's code builds it without drop path).
        self.teacher_encoder = (self.encoder.clone(drop_path_rate=0.0)
                                if isinstance(self.encoder, ViT) else self.encoder)
        _check_config(config, self.encoder, model_name, total_steps, steps_per_epoch)
        self.num_global, self.num_local = aug.num_global_crops, aug.num_local_crops
        self.global_views = (aug.view1, aug.view2)
        self.local_view = aug.local
        self.head = DINOHead(
            out_dim=cfg.out_dim, hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim,
            num_layers=cfg.head_layers, use_bn=cfg.head_bn, norm_last_layer=cfg.norm_last_layer,
            dtype=self.encoder.dtype)
        self.total_steps = max(total_steps, 1)
        self.warmup_steps = int(round(cfg.warmup_teacher_temp_epochs * max(steps_per_epoch, 1)))

    # --- Schedules -------------------------------------------------------------------------------
    def teacher_temperature(self, step: jax.Array) -> jax.Array:
        cfg = self.config.dino
        return teacher_temperature(step, cfg.warmup_teacher_temp, cfg.teacher_temp,
                                   self.warmup_steps)

    def teacher_momentum(self, step: jax.Array) -> jax.Array:
        return teacher_momentum(step, self.config.dino.momentum_teacher, self.total_steps)

    # --- Networks --------------------------------------------------------------------------------
    def augment(self, rng: jax.Array, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """``[batch, h, w, 3]`` uint8 -> normalised ``([batch, G, Sg, Sg, 3], [batch, L, Sl, Sl,
        3] or None)``."""
        return multicrop.multi_crop(rng, images, self.global_views, self.num_global,
                                    self.local_view, self.num_local)

    def _student(self, params, state, crops, rng):
        """``crops [batch, V, s, s, 3] -> ([batch, V, K], updated BatchNorm state)``."""
        batch, views = crops.shape[:2]
        feats, enc_state = self.encoder.apply(
            {"params": params["encoder"], **state["encoder"]}, multicrop.flatten_views(crops),
            train=True, mutable=list(state["encoder"]), rngs={"dropout": rng})
        out, head_state = self.head.apply(
            {"params": params["head"], **state["head"]}, feats, train=True,
            mutable=list(state["head"]))
        state = {"encoder": dict(enc_state), "head": dict(head_state)}
        return out.reshape(batch, views, -1), state

    def _teacher(self, extra, crops):
        """``crops [batch, G, s, s, 3] -> ([batch, G, K], teacher BatchNorm state)``, no gradient.

        As in DINO's code the teacher runs in training mode without stochastic depth: BatchNorm
        layers (ResNet backbones, ``head_bn``) normalise with the statistics of the global batch
        and update the teacher's own running statistics, which evaluation uses."""
        batch, views = crops.shape[:2]
        teacher, state = extra["teacher"], extra["teacher_state"]
        feats, enc_state = self.teacher_encoder.apply(
            {"params": teacher["encoder"], **state["encoder"]}, multicrop.flatten_views(crops),
            train=True, mutable=list(state["encoder"]))
        out, head_state = self.head.apply(
            {"params": teacher["head"], **state["head"]}, feats, train=True,
            mutable=list(state["head"]))
        state = {"encoder": dict(enc_state), "head": dict(head_state)}
        return jax.lax.stop_gradient(out.reshape(batch, views, -1)), state

    # --- The Method interface ----------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        k_enc, k_head = jax.random.split(rng)
        size = self.global_views[0].size
        x = jnp.zeros((batch["image"].shape[0], size, size, 3), jnp.float32)  # shapes only
        enc_vars = self.encoder.init({"params": k_enc, "dropout": k_enc}, x, train=False)
        feats = self.encoder.apply(enc_vars, x, train=False)
        head_vars = self.head.init(k_head, feats, train=False)
        enc_params, enc_state = _split_variables(enc_vars)
        head_params, head_state = _split_variables(head_vars)
        params = {"encoder": enc_params, "head": head_params}
        state = {"encoder": enc_state, "head": head_state}
        copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
        extra = {
            "state": state,  # the student's non-trained variables (BatchNorm statistics)
            "teacher": copy(params),  # the teacher starts as the student (DINO's code)
            "teacher_state": copy(state),  # the teacher's own BatchNorm statistics
            "center": jnp.zeros((self.config.dino.out_dim,), jnp.float32),
        }
        return params, extra

    def loss(self, params, extra, batch, rng, step):
        cfg = self.config.dino
        k_aug, k_global, k_local = jax.random.split(rng, 3)
        globals_, locals_ = self.augment(k_aug, batch["image"])
        student, state = self._student(params, extra["state"], globals_, k_global)
        if locals_ is not None:
            student_local, state = self._student(params, state, locals_, k_local)
            student = jnp.concatenate([student, student_local], axis=1)
        teacher, teacher_state = self._teacher(extra, globals_)
        temp = self.teacher_temperature(step)
        loss, metrics = dino_loss(student, teacher, extra["center"], cfg.student_temp, temp)
        center = update_center(extra["center"], teacher, cfg.center_momentum)
        metrics |= {"center_norm": jnp.linalg.norm(center), "teacher_temp": temp,
                    "teacher_momentum": self.teacher_momentum(step)}
        new_extra = {**extra, "state": state, "teacher_state": teacher_state, "center": center}
        return loss, (metrics, new_extra)

    def after_update(self, params, extra, step):
        """The EMA of the teacher's parameters (its BatchNorm statistics are its own)."""
        return {**extra, "teacher": ema(extra["teacher"], params, self.teacher_momentum(step))}

    def encoder_variables(self, params, extra) -> dict[str, Any]:
        """The teacher's backbone, as DINO evaluates it."""
        del params
        return {"params": extra["teacher"]["encoder"], **extra["teacher_state"]["encoder"]}


def _check_config(config, encoder, model_name: str, total_steps: int, steps_per_epoch: int):
    """Every DINO key that could fail later, as a ConfigError naming it, before compile."""
    cfg, aug = config.dino, config.aug
    require(cfg.out_dim >= 2, "dino.out_dim", f"K={cfg.out_dim} must be >= 2 (65536 on ImageNet)")
    for key in ("hidden_dim", "bottleneck_dim", "head_layers"):
        require(cfg[key] >= 1, f"dino.{key}", "must be >= 1")
    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        require(cfg[key] > 0, f"dino.{key}", "must be > 0")
    for key in ("center_momentum", "momentum_teacher"):
        require(0.0 <= cfg[key] <= 1.0, f"dino.{key}", "must be in [0, 1]")
    require(aug.num_global_crops >= 1, "aug.num_global_crops",
            f"is {aug.num_global_crops}: the teacher needs at least one global crop (DINO: 2)")
    require(aug.num_local_crops >= 0, "aug.num_local_crops", "must be >= 0")
    require(aug.num_global_crops + aug.num_local_crops >= 2, "aug.num_local_crops",
            "one global crop and no local crop leave no pair of views to compare; use 2 global "
            "crops or add local crops")
    if isinstance(encoder, ViT):
        patch = encoder.patch_size
        sizes = [("aug.view1.size", aug.view1.size), ("aug.view2.size", aug.view2.size)]
        if aug.num_local_crops:
            sizes.append(("aug.local.size", aug.local.size))
        for key, size in sizes:
            require(size % patch == 0, key,
                    f"crop size {size} px is not divisible by the patch size {patch} of "
                    f"model {model_name}; use a multiple of {patch}")
    require(aug.view2.size == aug.view1.size, "aug.view2.size",
            f"global crops must share one size: view1 is {aug.view1.size}, view2 {aug.view2.size}")
    require(cfg.warmup_teacher_temp_epochs >= 0, "dino.warmup_teacher_temp_epochs", "must be >= 0")
    if total_steps > 0 and steps_per_epoch > 0:
        run_epochs = total_steps / steps_per_epoch
        require(cfg.warmup_teacher_temp_epochs <= run_epochs, "dino.warmup_teacher_temp_epochs",
                f"the teacher-temperature warm-up ({cfg.warmup_teacher_temp_epochs} epochs) is "
                f"longer than the run ({run_epochs:.3g} epochs); shorten it or train longer")


def dino_config(**overrides: Any) -> ml_collections.ConfigDict:
    """DINO's ImageNet defaults (ViT-S/16 recipe of the paper's code)."""
    cfg = ml_collections.ConfigDict(dict(
        out_dim=65536, hidden_dim=2048, bottleneck_dim=256, head_layers=3, head_bn=False,
        norm_last_layer=True, student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs=30.0, center_momentum=0.9, momentum_teacher=0.996))
    cfg.update(overrides)
    return cfg


def create(config: ml_collections.ConfigDict, mesh: Mesh | None, total_steps: int = 0,
           steps_per_epoch: int = 0) -> DINO:
    """``total_steps`` / ``steps_per_epoch`` 0 (a job that only evaluates): schedules are not
    checked against the run length."""
    return DINO(config, mesh, total_steps, steps_per_epoch)

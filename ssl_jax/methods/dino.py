"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Self-distillation without labels. A student network (backbone + :class:`DINOHead`, below) sees all
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
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from ssl_jax.config import require
from ssl_jax.data import multicrop
from ssl_jax.methods.base import MethodBase
from ssl_jax.methods.ssl_math import (
    apply_network,
    cosine_momentum,
    ema,
    linear_warmup,
    split_variables,
    teacher_forward,
    update_center,
)
from ssl_jax.models.layers import Dense, matmul_float32
from ssl_jax.models.vit import ViT

# --- The head ------------------------------------------------------------------------------------


class WeightNormDense(nn.Module):
    """Weight-normalised linear layer without bias (Salimans & Kingma 2016), as DINO's last layer.

    ``W[:, j] = g_j * v[:, j] / ||v[:, j]||``: a direction ``v`` (parameter ``kernel_v``,
    ``[in, features]``) and a per-output gain ``g`` (parameter ``gain``, initialised to 1). With
    ``fix_gain`` there is no gain parameter: ``g = 1`` always (DINO's ``norm_last_layer``).
    ``[batch, in] -> [batch, features]`` float32, the product in ``dtype`` accumulated in
    float32.
    """

    features: int
    fix_gain: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        # PyTorch's default Linear init, U(+-1/sqrt(in)); only the direction matters.
        init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        v = self.param("kernel_v", init, (x.shape[-1], self.features))
        w = v / jnp.maximum(jnp.linalg.norm(v, axis=0, keepdims=True), 1e-12)
        if not self.fix_gain:
            w = w * self.param("gain", nn.initializers.ones, (self.features,))
        return matmul_float32(x.astype(self.dtype), w.astype(self.dtype))


class DINOHead(nn.Module):
    """The DINO projection head (Caron et al. 2021): MLP, L2 normalisation, weight-normed layer.

    ``num_layers - 1`` hidden layers Dense(hidden_dim) -> [BatchNorm] -> GELU, a Dense to
    ``bottleneck_dim``, ``x / ||x||``, then :class:`WeightNormDense` to ``out_dim`` = K
    (65536 for ImageNet), with its gain fixed to 1 when ``norm_last_layer``. Dense layers are
    initialised with trunc-normal(0.02) and zero bias, as DINO's code.

    ``__call__(x [batch, d], train) -> [batch, out_dim]`` float32 logits.
    """

    out_dim: int
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    use_bn: bool = False
    norm_last_layer: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        if self.num_layers < 1:
            raise ValueError(f"DINOHead num_layers={self.num_layers} must be >= 1.")
        chex.assert_rank(x, 2)
        batch = x.shape[0]
        x = x.astype(self.dtype)
        init = nn.initializers.truncated_normal(stddev=0.02)
        for i in range(self.num_layers - 1):
            x = Dense(self.hidden_dim, dtype=self.dtype, kernel_init=init, name=f"dense{i}")(x)
            if self.use_bn:
                x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, name=f"bn{i}")(x)
            x = nn.gelu(x, approximate=False)
        x = Dense(self.bottleneck_dim, dtype=self.dtype, kernel_init=init,
                     name=f"dense{self.num_layers - 1}")(x)
        x = x.astype(jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        x = WeightNormDense(self.out_dim, fix_gain=self.norm_last_layer, dtype=self.dtype,
                            name="last_layer")(x).astype(jnp.float32)
        chex.assert_shape(x, (batch, self.out_dim))
        return x



# --- The loss ------------------------------------------------------------------------------------


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


# --- The method ----------------------------------------------------------------------------------


class DINO(MethodBase):
    """Student (params) and EMA teacher (extra) trained by self-distillation on multi-crop."""

    CONFIG_KEYS = ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers", "head_bn",
                   "norm_last_layer", "student_temp", "teacher_temp", "warmup_teacher_temp",
                   "warmup_teacher_temp_epochs", "center_momentum", "momentum_teacher")

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None, **run_length: int):
        super().__init__(config, mesh, **run_length)
        cfg, aug = self.cfg, config.aug
        # The teacher has no stochastic depth (DINO's code builds it without drop path).
        self.teacher_encoder = (self.encoder.clone(drop_path_rate=0.0)
                                if isinstance(self.encoder, ViT) else self.encoder)
        _check_config(config, self.encoder, self.total_steps, self.steps_per_epoch)
        self.num_global, self.num_local = aug.num_global_crops, aug.num_local_crops
        self.global_views = (aug.view1, aug.view2)
        self.local_view = aug.local
        self.head = DINOHead(
            out_dim=cfg.out_dim, hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim,
            num_layers=cfg.head_layers, use_bn=cfg.head_bn, norm_last_layer=cfg.norm_last_layer,
            dtype=self.encoder.dtype)
        self.warmup_steps = int(round(cfg.warmup_teacher_temp_epochs
                                      * max(self.steps_per_epoch, 1)))

    # --- Schedules -------------------------------------------------------------------------------
    def teacher_temperature(self, step: jax.Array) -> jax.Array:
        """tau_t: linear from ``warmup_teacher_temp`` to ``teacher_temp`` over the warm-up
        epochs, constant after (DINO's code steps the same line once per epoch)."""
        cfg = self.cfg
        return linear_warmup(step, cfg.warmup_teacher_temp, cfg.teacher_temp, self.warmup_steps)

    def teacher_momentum(self, step: jax.Array) -> jax.Array:
        """lambda: cosine from ``momentum_teacher`` to 1 over the run."""
        return cosine_momentum(step, self.cfg.momentum_teacher, max(self.total_steps, 1))

    # --- Networks --------------------------------------------------------------------------------
    def augment(self, rng: jax.Array, images: jax.Array, image_hw: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array | None]:
        """``[batch, h, w, 3]`` uint8 -> normalised ``([batch, G, Sg, Sg, 3], [batch, L, Sl, Sl,
        3] or None)``."""
        return multicrop.multi_crop(rng, images, self.global_views, self.num_global,
                                    self.local_view, self.num_local, image_hw=image_hw)

    def _network(self, encoder, params, state, crops, forward):
        """``crops [batch, V, s, s, 3] -> ([batch, V, K], updated BatchNorm state)`` through
        ``encoder`` and the head, each applied by ``forward`` (student or teacher)."""
        batch, views = crops.shape[:2]
        feats, enc_state = forward(encoder, params["encoder"], state["encoder"],
                                   multicrop.flatten_views(crops))
        out, head_state = forward(self.head, params["head"], state["head"], feats)
        return out.reshape(batch, views, -1), {"encoder": enc_state, "head": head_state}

    def _student(self, params, state, crops, rng):
        def forward(module, p, s, x):
            return apply_network(module, p, s, x, train=True,
                                 rng=rng if module is self.encoder else None)

        return self._network(self.encoder, params, state, crops, forward)

    def _teacher(self, extra, crops):
        """As in DINO's code the teacher runs in training mode without stochastic depth:
        BatchNorm layers (ResNet backbones, ``head_bn``) normalise with the statistics of the
        global batch and update the teacher's own running statistics, which evaluation uses."""
        return self._network(self.teacher_encoder, extra["teacher"], extra["teacher_state"],
                             crops, teacher_forward)

    # --- The Method interface ----------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        k_enc, k_head = jax.random.split(rng)
        size = self.global_views[0].size
        x = jnp.zeros((batch["image"].shape[0], size, size, 3), jnp.float32)  # shapes only
        enc_params, enc_state = split_variables(
            self.encoder.init({"params": k_enc, "dropout": k_enc}, x, train=False))
        feats, _ = apply_network(self.encoder, enc_params, enc_state, x, train=False)
        head_params, head_state = split_variables(self.head.init(k_head, feats, train=False))
        params = {"encoder": enc_params, "head": head_params}
        state = {"encoder": enc_state, "head": head_state}
        copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
        extra = {
            "state": state,  # the student's non-trained variables (BatchNorm statistics)
            "teacher": copy(params),  # the teacher starts as the student (DINO's code)
            "teacher_state": copy(state),  # the teacher's own BatchNorm statistics
            "center": jnp.zeros((self.cfg.out_dim,), jnp.float32),
        }
        return params, extra

    def loss(self, params, extra, batch, rng, step):
        cfg = self.cfg
        k_aug, k_global, k_local = jax.random.split(rng, 3)
        globals_, locals_ = self.augment(k_aug, batch["image"], batch.get("image_hw"))
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


METHOD = DINO


def _check_config(config, encoder, total_steps: int, steps_per_epoch: int):
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
    if isinstance(encoder, ViT) and aug.num_local_crops:  # global crops: checked with the ViT
        patch = encoder.patch_size
        require(aug.local.size % patch == 0, "aug.local.size",
                f"crop size {aug.local.size} px is not divisible by the patch size {patch} of "
                f"model {config.model.name}; use a multiple of {patch}")
    require(aug.view2.size == aug.view1.size, "aug.view2.size",
            f"global crops must share one size: view1 is {aug.view1.size}, view2 {aug.view2.size}")
    require(cfg.warmup_teacher_temp_epochs >= 0, "dino.warmup_teacher_temp_epochs", "must be >= 0")
    if total_steps > 0 and steps_per_epoch > 0:
        run_epochs = total_steps / steps_per_epoch
        require(cfg.warmup_teacher_temp_epochs <= run_epochs, "dino.warmup_teacher_temp_epochs",
                f"the teacher-temperature warm-up ({cfg.warmup_teacher_temp_epochs} epochs) is "
                f"longer than the run ({run_epochs:.3g} epochs); shorten it or train longer")

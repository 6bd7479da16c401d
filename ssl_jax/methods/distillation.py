"""Self-distillation with an EMA teacher on multi-crop views: what DINO and iBOT share.

- :class:`DINOHead` (with :class:`WeightNormDense`): MLP, L2 normalisation, weight-normalised last
  layer (Caron et al. 2021). On ``[batch, 1 + n, d]`` tokens (cls first) it gives iBOT's two
  outputs: the cls token's ``[batch, K]`` and the patch tokens' ``[batch, n, K']``, through the
  same MLP and either the same last layer or a second one (``patch_out_dim > 0``).
- :func:`centred_softmax` (the teacher's ``softmax((g_t - C) / tau_t)``) and :func:`dino_loss`
  (DINO's cross-entropy over all pairs of different views, iBOT's cls-token term).
- :class:`SelfDistillation`: a :class:`~ssl_jax.methods.base.MethodBase` with the student in
  ``params``, the teacher (the student's EMA, without stochastic depth) and its BatchNorm
  statistics in ``extra``, multi-crop views, the teacher temperature's linear warm-up, the
  teacher momentum's cosine, and evaluation of the teacher's backbone. Its ``extra`` holds
  ``state``, ``teacher``, ``teacher_state`` and the method's centres (:meth:`initial_centres`).
- :func:`check_config`: the keys both methods have, each a ConfigError naming it.
"""

from __future__ import annotations

from collections.abc import Callable
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
)
from ssl_jax.models.layers import Dense, matmul_float32
from ssl_jax.models.vit import ViT

# --- The head ------------------------------------------------------------------------------------


class WeightNormDense(nn.Module):
    """Weight-normalised linear layer without bias (Salimans & Kingma 2016), as DINO's last layer.

    ``W[:, j] = g_j * v[:, j] / ||v[:, j]||``: a direction ``v`` (parameter ``kernel_v``,
    ``[in, features]``) and a per-output gain ``g`` (parameter ``gain``, initialised to 1). With
    ``fix_gain`` there is no gain parameter: ``g = 1`` always (DINO's ``norm_last_layer``).
    ``[..., in] -> [..., features]`` float32, the product in ``dtype`` accumulated in float32.
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

    ``__call__(x [batch, d], train) -> [batch, out_dim]`` float32 logits. iBOT's tokens
    ``x [batch, 1 + n, d]`` (cls first; BatchNorm statistics over all tokens, as iBOT's head) ->
    ``([batch, out_dim], [batch, n, P])``: the patch tokens through the same last layer
    (``P = out_dim``), or through a second one, ``last_layer2``, when ``patch_out_dim > 0``
    (``P = patch_out_dim``; iBOT's ``shared_head=False``).
    """

    out_dim: int
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    use_bn: bool = False
    norm_last_layer: bool = True
    patch_out_dim: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> Any:
        if self.num_layers < 1:
            raise ValueError(f"DINOHead num_layers={self.num_layers} must be >= 1.")
        chex.assert_rank(x, {2, 3})
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1]).astype(self.dtype)
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
        x = x.reshape(*lead, -1)
        last = WeightNormDense(self.out_dim, fix_gain=self.norm_last_layer, dtype=self.dtype,
                               name="last_layer")
        if len(lead) == 1:
            out = last(x).astype(jnp.float32)
            chex.assert_shape(out, (lead[0], self.out_dim))
            return out
        patch_last = last if not self.patch_out_dim else WeightNormDense(
            self.patch_out_dim, fix_gain=self.norm_last_layer, dtype=self.dtype,
            name="last_layer2")
        return last(x[:, 0]).astype(jnp.float32), patch_last(x[:, 1:]).astype(jnp.float32)


# --- The loss ------------------------------------------------------------------------------------


def centred_softmax(teacher_out: jax.Array, center: jax.Array, temp: jax.Array | float
                    ) -> tuple[jax.Array, jax.Array]:
    """The teacher's centred and sharpened distribution ``P_t = softmax((g_t - C) / tau_t)`` over
    the last axis, and its log, float32 and without gradient: ``teacher_out [..., K]``,
    ``center [K]``."""
    chex.assert_equal(teacher_out.shape[-1], center.shape[-1])
    teacher = jax.lax.stop_gradient(teacher_out).astype(jnp.float32)
    log_pt = jax.nn.log_softmax((teacher - jax.lax.stop_gradient(center)) / temp, axis=-1)
    return jnp.exp(log_pt), log_pt


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
    pt, log_pt = centred_softmax(teacher_out, center, teacher_temp)
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


# --- The method's structure ----------------------------------------------------------------------

Forward = Callable[..., tuple[Any, dict[str, Any]]]


class SelfDistillation(MethodBase):
    """Student (``params``) and EMA teacher (``extra``) on multi-crop views; subclasses define
    the head (:meth:`make_head`), the centres (:meth:`initial_centres`) and the loss. The
    config section has DINO's keys (see :func:`check_config`)."""

    #: keyword arguments of the encoder whose output the head is initialised on (iBOT: tokens)
    HEAD_INPUT: dict[str, Any] = {}

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None, **run_length: int):
        super().__init__(config, mesh, **run_length)
        aug = config.aug
        # The teacher has no stochastic depth (DINO's and iBOT's code build it without).
        self.teacher_encoder = (self.encoder.clone(drop_path_rate=0.0)
                                if isinstance(self.encoder, ViT) else self.encoder)
        check_config(config, self.encoder, self.total_steps, self.steps_per_epoch)
        self.num_global, self.num_local = aug.num_global_crops, aug.num_local_crops
        self.global_views = (aug.view1, aug.view2)
        self.local_view = aug.local
        self.head = self.make_head()
        self.warmup_steps = int(round(self.cfg.warmup_teacher_temp_epochs
                                      * max(self.steps_per_epoch, 1)))

    def make_head(self) -> nn.Module:
        cfg = self.cfg
        return DINOHead(
            out_dim=cfg.out_dim, hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim,
            num_layers=cfg.head_layers, use_bn=cfg.head_bn, norm_last_layer=cfg.norm_last_layer,
            dtype=self.encoder.dtype)

    def initial_centres(self) -> dict[str, jax.Array]:
        return {"center": jnp.zeros((self.cfg.out_dim,), jnp.float32)}

    # --- Schedules -------------------------------------------------------------------------------
    def teacher_temperature(self, step: jax.Array, start: float | None = None,
                            end: float | None = None) -> jax.Array:
        """tau_t: linear from ``warmup_teacher_temp`` (or ``start``) to ``teacher_temp`` (or
        ``end``) over the warm-up epochs, constant after (the official code steps the same line
        once per epoch)."""
        cfg = self.cfg
        start = cfg.warmup_teacher_temp if start is None else start
        end = cfg.teacher_temp if end is None else end
        return linear_warmup(step, start, end, self.warmup_steps)

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

    def student_forward(self, rng: jax.Array) -> Forward:
        """``forward(module, params, state, x, **kw) -> (out, state)`` of the student in training
        mode; ``rng`` drives the encoder's stochastic depth."""
        def forward(module, p, s, x, **kwargs):
            return apply_network(module, p, s, x, train=True,
                                 rng=rng if module is self.encoder else None, **kwargs)

        return forward

    @staticmethod
    def teacher_forward() -> Forward:
        """As in DINO's code the teacher runs in training mode without stochastic depth:
        BatchNorm layers (ResNet backbones, ``head_bn``) normalise with the statistics of the
        global batch and update the teacher's own running statistics, which evaluation uses."""
        return teacher_forward

    # --- The Method interface ----------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        k_enc, k_head = jax.random.split(rng)
        size = self.global_views[0].size
        x = jnp.zeros((batch["image"].shape[0], size, size, 3), jnp.float32)  # shapes only
        enc_params, enc_state = split_variables(
            self.encoder.init({"params": k_enc, "dropout": k_enc}, x, train=False))
        feats, _ = apply_network(self.encoder, enc_params, enc_state, x, train=False,
                                 **self.HEAD_INPUT)
        head_params, head_state = split_variables(self.head.init(k_head, feats, train=False))
        params = {"encoder": enc_params, "head": head_params}
        state = {"encoder": enc_state, "head": head_state}
        copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
        extra = {
            "state": state,  # the student's non-trained variables (BatchNorm statistics)
            "teacher": copy(params),  # the teacher starts as the student (DINO's code)
            "teacher_state": copy(state),  # the teacher's own BatchNorm statistics
            **self.initial_centres(),
        }
        return params, extra

    def after_update(self, params, extra, step):
        """The EMA of the teacher's parameters (its BatchNorm statistics are its own)."""
        return {**extra, "teacher": ema(extra["teacher"], params, self.teacher_momentum(step))}

    def encoder_variables(self, params, extra) -> dict[str, Any]:
        """The teacher's backbone, as DINO and iBOT evaluate it."""
        del params
        return {"params": extra["teacher"]["encoder"], **extra["teacher_state"]["encoder"]}

    def with_encoder(self, params, extra, variables):
        """Student and teacher both start from ``variables`` (DINO's teacher starts as the
        student)."""
        copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
        enc, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
        return ({**params, "encoder": enc},
                {**extra, "state": {**extra["state"], "encoder": state},
                 "teacher": {**extra["teacher"], "encoder": copy(enc)},
                 "teacher_state": {**extra["teacher_state"], "encoder": copy(state)}})


def check_config(config, encoder, total_steps: int, steps_per_epoch: int) -> None:
    """Every key of DINO's that could fail later (in ``config.<method>`` and ``config.aug``), as a
    ConfigError naming it, before compile."""
    name = config.method
    cfg, aug = config[name], config.aug
    require(cfg.out_dim >= 2, f"{name}.out_dim",
            f"K={cfg.out_dim} must be >= 2 (65536 on ImageNet)")
    for key in ("hidden_dim", "bottleneck_dim", "head_layers"):
        require(cfg[key] >= 1, f"{name}.{key}", "must be >= 1")
    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        require(cfg[key] > 0, f"{name}.{key}", "must be > 0")
    for key in ("center_momentum", "momentum_teacher"):
        require(0.0 <= cfg[key] <= 1.0, f"{name}.{key}", "must be in [0, 1]")
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
    key = f"{name}.warmup_teacher_temp_epochs"
    require(cfg.warmup_teacher_temp_epochs >= 0, key, "must be >= 0")
    if total_steps > 0 and steps_per_epoch > 0:
        run_epochs = total_steps / steps_per_epoch
        require(cfg.warmup_teacher_temp_epochs <= run_epochs, key,
                f"the teacher-temperature warm-up ({cfg.warmup_teacher_temp_epochs} epochs) is "
                f"longer than the run ({run_epochs:.3g} epochs); shorten it or train longer")

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

The head, the loss and the student-teacher structure (schedules, EMA, evaluated encoder) are
shared with iBOT in ``ssl_jax.methods.distillation``; this file holds DINO's networks and step.

Config keys: ``config.dino.{out_dim, hidden_dim, bottleneck_dim, head_layers, head_bn,
norm_last_layer, student_temp, teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs,
center_momentum, momentum_teacher}``; ``config.aug.{view1, view2}`` (global crops 1 and 2),
``config.aug.local`` (local crops), ``config.aug.{num_global_crops, num_local_crops}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_jax.data import multicrop
from ssl_jax.methods.distillation import (  # noqa: F401 (DINO's head and loss, by their names)
    DINOHead,
    SelfDistillation,
    WeightNormDense,
    dino_loss,
)
from ssl_jax.methods.ssl_math import update_center


class DINO(SelfDistillation):
    """Student (params) and EMA teacher (extra) trained by self-distillation on multi-crop."""

    CONFIG_KEYS = ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers", "head_bn",
                   "norm_last_layer", "student_temp", "teacher_temp", "warmup_teacher_temp",
                   "warmup_teacher_temp_epochs", "center_momentum", "momentum_teacher")

    def _network(self, encoder, params, state, crops, forward):
        """``crops [batch, V, s, s, 3] -> ([batch, V, K], updated BatchNorm state)`` through
        ``encoder`` and the head, each applied by ``forward`` (student or teacher)."""
        batch, views = crops.shape[:2]
        feats, enc_state = forward(encoder, params["encoder"], state["encoder"],
                                   multicrop.flatten_views(crops))
        out, head_state = forward(self.head, params["head"], state["head"], feats)
        return out.reshape(batch, views, -1), {"encoder": enc_state, "head": head_state}

    def _student(self, params, state, crops, rng):
        return self._network(self.encoder, params, state, crops, self.student_forward(rng))

    def _teacher(self, extra, crops):
        return self._network(self.teacher_encoder, extra["teacher"], extra["teacher_state"],
                             crops, self.teacher_forward())

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


METHOD = DINO

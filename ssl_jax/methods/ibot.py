"""iBOT (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer").

DINO's self-distillation (``ssl_jax.methods.distillation``: the head, centring, sharpening, the
EMA teacher, multi-crop) plus masked image modelling whose tokenizer is the teacher itself. Each
of the ``G`` global crops of an image is masked with probability ``mask_prob`` (0.5; otherwise
not at all), with BEiT-style blocks covering a share of the patches drawn uniformly in
``mask_ratio`` ([0.1, 0.5]); the student sees the masked global crops (masked patch embeddings
replaced by a learned mask token) and the local crops unmasked, the teacher the global crops
unmasked. With ``P = softmax(g / tau)`` on the cls token (superscript c) and on each patch token
``i`` (superscript p), the loss (Eq. 3 of the paper, as the official ``iBOTLoss``) is::

    L = lambda_1 L_cls + lambda_2 L_patch
    L_cls   = 1/|pairs| sum_{t in global} sum_{s != t} H(P^c_t(u_t), P^c_s(v_s))   (DINO's loss)
    L_patch = 1/G sum_{t in global} mean_batch [ sum_i m_ti H(P^p_t(u_t)_i, P^p_s(v_t)_i)
                                                 / max(sum_i m_ti, 1) ]

where ``u`` are the unmasked crops, ``v`` the student's (masked) ones and ``m_ti = 1`` for the
masked patches of global crop ``t`` (a crop without mask adds 0 to its image's term). The
teacher's patch distribution has its own centre ``C'`` (the mean over every patch token of the
global batch, momentum ``patch_center_momentum``) and temperature (``warmup_teacher_patch_temp``
-> ``teacher_patch_temp`` over the same warm-up epochs as the cls token's). The cls and patch
tokens go through the same head (:class:`~ssl_jax.methods.distillation.DINOHead`, ``shared_head``,
the paper's default) or the same MLP and separate last layers (``patch_out_dim`` outputs).

Only masked patches enter ``L_patch``, and a crop has at most ``floor(hi * N)`` of them
(``mask_ratio = (lo, hi)``), so the student's head runs on that many patches per crop (the
masked ones first; :meth:`IBOT.masked_first`) instead of all ``N``: the same loss and gradients
for half of the student's patch-head work at ``hi = 0.5`` (a head with BatchNorm still sees
every token, its statistics span them). The teacher's head sees every patch: its centre is their
mean.

``extra`` holds the teacher, both centres and BatchNorm statistics; evaluation uses the
teacher's backbone.

Config keys: DINO's (``config.ibot.{out_dim, hidden_dim, bottleneck_dim, head_layers, head_bn,
norm_last_layer, student_temp, teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs,
center_momentum, momentum_teacher}``) and ``config.ibot.{patch_out_dim, shared_head,
teacher_patch_temp, warmup_teacher_patch_temp, patch_center_momentum, cls_loss_weight,
patch_loss_weight, mask_ratio, mask_prob, min_block_patches, min_aspect}``; ``config.aug`` as
DINO's.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp

from ssl_jax.config import require
from ssl_jax.data import masking, multicrop
from ssl_jax.methods.distillation import DINOHead, SelfDistillation, centred_softmax, dino_loss
from ssl_jax.methods.ssl_math import update_center


def patch_loss(student_patch: jax.Array, teacher_patch: jax.Array, mask: jax.Array,
               center: jax.Array, student_temp: float, teacher_temp: jax.Array | float
               ) -> jax.Array:
    """iBOT's masked patch-token distillation ``L_patch`` (see the module docstring).

    ``student_patch, teacher_patch [batch, G, N, K]`` (the same global crops, the student's
    masked), ``mask [batch, G, N]`` (True = masked), ``center [K]``. Per crop: the cross-entropy
    summed over its masked patches divided by their number (at least 1); the mean over images
    and global crops."""
    chex.assert_equal_shape([student_patch, teacher_patch])
    chex.assert_shape(mask, student_patch.shape[:3])
    log_ps = jax.nn.log_softmax(student_patch.astype(jnp.float32) / student_temp, axis=-1)
    pt, _ = centred_softmax(teacher_patch, center, teacher_temp)
    cross = -jnp.sum(pt * log_ps, axis=-1)  # [batch, G, N]
    m = mask.astype(jnp.float32)
    per_crop = jnp.sum(cross * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    return jnp.mean(per_crop)


class IBOT(SelfDistillation):
    """DINO's cls-token self-distillation plus masked patch-token distillation from the teacher."""

    CONFIG_KEYS = ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers", "head_bn",
                   "norm_last_layer", "student_temp", "teacher_temp", "warmup_teacher_temp",
                   "warmup_teacher_temp_epochs", "center_momentum", "momentum_teacher",
                   "patch_out_dim", "shared_head", "teacher_patch_temp",
                   "warmup_teacher_patch_temp", "patch_center_momentum", "cls_loss_weight",
                   "patch_loss_weight", "mask_ratio", "mask_prob", "min_block_patches",
                   "min_aspect")
    HEAD_INPUT = {"return_tokens": True}  # the head is built on cls + patch tokens

    def __init__(self, config, mesh, **run_length):
        _check_encoder(config)
        super().__init__(config, mesh, **run_length)
        size = self.global_views[0].size
        self.grid = (size // self.encoder.patch_size,) * 2
        _check_config(config, self.grid)
        # How many patches per crop the student's head sees (the module docstring says why).
        n = self.grid[0] * self.grid[1]
        self.patch_budget = n if self.cfg.head_bn else math.floor(self.cfg.mask_ratio[1] * n)

    def make_head(self) -> DINOHead:
        cfg = self.cfg
        return DINOHead(
            out_dim=cfg.out_dim, hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim,
            num_layers=cfg.head_layers, use_bn=cfg.head_bn, norm_last_layer=cfg.norm_last_layer,
            patch_out_dim=0 if cfg.shared_head else cfg.patch_out_dim, dtype=self.encoder.dtype)

    def initial_centres(self):
        cfg = self.cfg
        patch_dim = cfg.out_dim if cfg.shared_head else cfg.patch_out_dim
        return {"center": jnp.zeros((cfg.out_dim,), jnp.float32),
                "patch_center": jnp.zeros((patch_dim,), jnp.float32)}

    def patch_temperature(self, step: jax.Array) -> jax.Array:
        cfg = self.cfg
        return self.teacher_temperature(step, cfg.warmup_teacher_patch_temp,
                                        cfg.teacher_patch_temp)

    def masks(self, rng: jax.Array, batch: int) -> jax.Array:
        """``[batch, G, N]`` bool (True = masked): per global crop, with probability
        ``mask_prob`` a blockwise mask of about ``r * N`` patches, ``r ~ U(mask_ratio)``
        (iBOT's ``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2``), else none."""
        cfg = self.cfg
        n = self.grid[0] * self.grid[1]
        k_on, k_ratio, k_block = jax.random.split(rng, 3)
        shape = (batch * self.num_global,)
        ratio = jax.random.uniform(k_ratio, shape, minval=cfg.mask_ratio[0],
                                   maxval=cfg.mask_ratio[1])
        target = jnp.where(jax.random.bernoulli(k_on, cfg.mask_prob, shape), ratio * n, 0.0)
        sample = functools.partial(masking.block_mask, grid=self.grid,
                                   min_block=cfg.min_block_patches, min_aspect=cfg.min_aspect)
        keys = jax.random.split(k_block, shape[0])
        masks = jax.vmap(lambda k, t: sample(k, num_masked=t))(keys, target)
        return masks.reshape(batch, self.num_global, n)

    def masked_first(self, mask: jax.Array) -> jax.Array:
        """``[batch, G, patch_budget]`` patch indices per crop: its masked patches (all of them:
        at most ``patch_budget``) in grid order, then unmasked ones to fill the budget."""
        return jnp.argsort(~mask, axis=-1, stable=True)[..., :self.patch_budget]

    def tokens_out(self, encoder, params, state, crops, forward, mask=None, keep=None):
        """``crops [batch, V, s, s, 3]`` (and their ``mask [batch, V, N]``) through ``encoder``
        and the head -> ``((cls [batch, V, K], patches [batch, V, N, P]), BatchNorm state)``;
        with ``keep [batch, V, M]`` the head sees those patches only (``[batch, V, M, P]``)."""
        batch, views = crops.shape[:2]
        kwargs = {} if mask is None else {"bool_masked_pos": mask.reshape(batch * views, -1)}
        tokens, enc_state = forward(encoder, params["encoder"], state["encoder"],
                                    multicrop.flatten_views(crops), return_tokens=True, **kwargs)
        if keep is not None:
            kept = jnp.take_along_axis(tokens[:, 1:], keep.reshape(batch * views, -1, 1), axis=1)
            tokens = jnp.concatenate([tokens[:, :1], kept], axis=1)
        (cls, patches), head_state = forward(self.head, params["head"], state["head"], tokens)
        out = (cls.reshape(batch, views, -1), patches.reshape(batch, views, *patches.shape[1:]))
        return out, {"encoder": enc_state, "head": head_state}

    def local_cls_out(self, params, state, crops, forward):
        """The student's cls-token outputs ``[batch, L, K]`` of the (unmasked) local crops."""
        batch, views = crops.shape[:2]
        tokens, enc_state = forward(self.encoder, params["encoder"], state["encoder"],
                                    multicrop.flatten_views(crops), return_tokens=True)
        cls, head_state = forward(self.head, params["head"], state["head"], tokens[:, 0])
        return cls.reshape(batch, views, -1), {"encoder": enc_state, "head": head_state}

    # --- The Method interface ----------------------------------------------------------------
    def loss(self, params, extra, batch, rng, step):
        cfg = self.cfg
        k_aug, k_mask, k_global, k_local = jax.random.split(rng, 4)
        globals_, locals_ = self.augment(k_aug, batch["image"], batch.get("image_hw"))
        mask = self.masks(k_mask, globals_.shape[0])
        keep = self.masked_first(mask)
        (student_cls, student_patch), state = self.tokens_out(
            self.encoder, params, extra["state"], globals_, self.student_forward(k_global), mask,
            keep)
        if locals_ is not None:
            local_cls, state = self.local_cls_out(params, state, locals_,
                                                  self.student_forward(k_local))
            student_cls = jnp.concatenate([student_cls, local_cls], axis=1)
        (teacher_cls, teacher_patch), teacher_state = self.tokens_out(
            self.teacher_encoder, extra["teacher"], extra["teacher_state"], globals_,
            self.teacher_forward())
        temp, patch_temp = self.teacher_temperature(step), self.patch_temperature(step)
        cls_loss, metrics = dino_loss(student_cls, teacher_cls, extra["center"],
                                      cfg.student_temp, temp)
        mim_loss = patch_loss(student_patch, jnp.take_along_axis(teacher_patch, keep[..., None], 2),
                              jnp.take_along_axis(mask, keep, 2), extra["patch_center"],
                              cfg.student_temp, patch_temp)
        loss = cfg.cls_loss_weight * cls_loss + cfg.patch_loss_weight * mim_loss
        center = update_center(extra["center"], teacher_cls, cfg.center_momentum)
        patch_center = update_center(extra["patch_center"], teacher_patch,
                                     cfg.patch_center_momentum)
        metrics |= {"cls_loss": cls_loss, "patch_loss": mim_loss, "teacher_temp": temp,
                    "teacher_patch_temp": patch_temp, "mask_ratio": jnp.mean(mask),
                    "center_norm": jnp.linalg.norm(center),
                    "patch_center_norm": jnp.linalg.norm(patch_center),
                    "teacher_momentum": self.teacher_momentum(step)}
        new_extra = {**extra, "state": state, "teacher_state": teacher_state, "center": center,
                     "patch_center": patch_center}
        return loss, (metrics, new_extra)


METHOD = IBOT


def _check_encoder(config) -> None:
    """iBOT distils patch tokens: a ViT with a mask token (before the encoder is built)."""
    model = config.model
    require(str(model.name).startswith("vit"), "model.name",
            f"iBOT needs patch tokens (a ViT); {model.name!r} has none: use e.g. model=vit_s16")
    require(bool(model.get("use_mask_token", False)), "model.use_mask_token",
            "iBOT replaces masked patch embeddings of the student by the mask token: set it True")


def _check_config(config, grid: tuple[int, int]) -> None:
    """Every iBOT key that could fail later (beyond DINO's), as a ConfigError naming it."""
    cfg = config.ibot
    if not cfg.shared_head:
        require(cfg.patch_out_dim >= 2, "ibot.patch_out_dim",
                f"K'={cfg.patch_out_dim} must be >= 2 (8192 on ImageNet)")
    for key in ("teacher_patch_temp", "warmup_teacher_patch_temp"):
        require(cfg[key] > 0, f"ibot.{key}", "must be > 0")
    require(0.0 <= cfg.patch_center_momentum <= 1.0, "ibot.patch_center_momentum",
            "must be in [0, 1]")
    for key in ("cls_loss_weight", "patch_loss_weight"):
        require(cfg[key] >= 0, f"ibot.{key}", f"{cfg[key]} must be >= 0 (iBOT: 1.0)")
    lo_hi = cfg.mask_ratio
    require(isinstance(lo_hi, (tuple, list)) and len(lo_hi) == 2
            and 0.0 < lo_hi[0] <= lo_hi[1] < 1.0, "ibot.mask_ratio",
            f"{lo_hi!r} must be a range (lo, hi) with 0 < lo <= hi < 1 (iBOT: (0.1, 0.5))")
    require(0.0 <= cfg.mask_prob <= 1.0, "ibot.mask_prob",
            f"{cfg.mask_prob} must be a probability (iBOT: 0.5)")
    require(0.0 < cfg.min_aspect <= 1.0, "ibot.min_aspect", f"{cfg.min_aspect} must be in (0, 1]")
    side = math.isqrt(max(int(cfg.min_block_patches), 1))
    require(cfg.min_block_patches >= 1 and side < min(grid), "ibot.min_block_patches",
            f"blocks of at least {cfg.min_block_patches} patches do not fit in the "
            f"{grid[0]}x{grid[1]} patch grid (iBOT: (min side // 3)^2); lower it")

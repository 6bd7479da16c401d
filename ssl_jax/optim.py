"""Optimizers and learning-rate schedules, all from optax.

``config.optim`` holds::

    name            'lars' | 'adamw' | 'sgd'
    base_lr         learning rate at a global batch of 256 (scaled by ``lr_scaling``)
    lr_scaling      'linear' (lr = base_lr * B / 256), 'sqrt' (base_lr * sqrt(B / 256)) or 'none'
    warmup_epochs   linear warm-up from 0, then cosine decay to ``end_lr_factor * lr``
    end_lr_factor
    weight_decay    decoupled weight decay (LARS: added to the gradient before the trust ratio)
    momentum        LARS / SGD momentum
    b1, b2          AdamW betas
    grad_clip_norm  global-norm clipping (0 disables)

Weight decay and LARS's trust-ratio adaptation skip biases and normalisation parameters (every
parameter with fewer than 2 dimensions), as SimCLR, BYOL and MAE do.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import optax

from ssl_jax.config import require


def peak_learning_rate(cfg: ml_collections.ConfigDict, global_batch_size: int) -> float:
    """``base_lr`` scaled to the global batch: linear (Goyal et al. 2017) or square-root."""
    ratio = global_batch_size / 256
    scale = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}.get(cfg.lr_scaling)
    require(scale is not None, "optim.lr_scaling", "must be 'linear', 'sqrt' or 'none'")
    return cfg.base_lr * scale


def learning_rate_schedule(
    cfg: ml_collections.ConfigDict, global_batch_size: int, total_steps: int, steps_per_epoch: int
) -> optax.Schedule:
    """Linear warm-up over ``warmup_epochs`` then cosine decay to ``end_lr_factor`` x peak."""
    peak = peak_learning_rate(cfg, global_batch_size)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=peak * cfg.end_lr_factor,
    )


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay (kernels), False for biases and norm scales."""
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(
    cfg: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """The optimizer named by ``cfg.name`` driven by ``schedule``, with optional clipping."""
    require(cfg.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    require(cfg.base_lr > 0, "optim.base_lr", "must be > 0")
    if cfg.name == "lars":
        tx = optax.lars(
            schedule,
            weight_decay=cfg.weight_decay,
            weight_decay_mask=decay_mask,
            trust_ratio_mask=decay_mask,
            momentum=cfg.momentum,
        )
    elif cfg.name == "adamw":
        tx = optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    elif cfg.name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
            optax.sgd(schedule, momentum=cfg.momentum),
        )
    else:
        raise ValueError(f"config.optim.name={cfg.name!r} must be 'lars', 'adamw' or 'sgd'")
    if cfg.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    return tx


def optim_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Defaults (SimCLR's LARS recipe); config files override what their method needs."""
    cfg = ml_collections.ConfigDict(
        dict(
            name="lars",
            base_lr=0.3,
            lr_scaling="linear",
            warmup_epochs=10.0,
            end_lr_factor=0.0,
            weight_decay=1e-6,
            momentum=0.9,
            b1=0.9,
            b2=0.999,
            grad_clip_norm=0.0,
        )
    )
    cfg.update(overrides)
    return cfg

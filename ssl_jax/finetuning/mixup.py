"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) with label smoothing, on the device.

The semantics are timm's ``Mixup`` in its default 'batch' mode, as used by DeiT and MAE
fine-tuning: one draw per global batch, image ``i`` mixed with image ``n - 1 - i`` (the batch
reversed). With probability ``prob`` a batch is mixed at all; when both alphas are positive it
uses CutMix with probability ``switch_prob``, else Mixup.

- Mixup: ``lam ~ Beta(a, a)``, ``x_i <- lam x_i + (1 - lam) x_{n-1-i}``.
- CutMix: ``lam ~ Beta(a, a)``, a box of side ``int(H sqrt(1 - lam))`` x ``int(W sqrt(1 - lam))``
  centred at a uniform pixel and clipped to the image is pasted from ``x_{n-1-i}``; ``lam``
  becomes the share of the image left unpasted, ``1 - box_area / (H W)``.

Targets are soft: with label smoothing ``s`` over ``C`` classes, ``y_i = (1 - s) onehot_i + s / C``
and the target of image ``i`` is ``lam y_i + (1 - lam) y_{n-1-i}``.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp


class MixParams(NamedTuple):
    """One batch's draw: ``lam`` (float32 ``[]``, the weight of each image's own content and
    label), ``cutmix`` (bool ``[]``), ``box`` (int32 ``[4]``: top, bottom, left, right; rows
    ``[top, bottom)``, columns ``[left, right)`` come from the reversed batch under CutMix)."""

    lam: jax.Array
    cutmix: jax.Array
    box: jax.Array


def smoothed_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """``[batch]`` int labels -> ``[batch, num_classes]``: ``1 - s + s / C`` on the label,
    ``s / C`` elsewhere (rows sum to 1)."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(key: jax.Array, height: int, width: int, lam: jax.Array) -> jax.Array:
    """timm's ``rand_bbox``: int32 ``[4]`` (top, bottom, left, right) of a box covering about
    ``1 - lam`` of the image, its centre uniform over the pixels, clipped to the image."""
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    k_y, k_x = jax.random.split(key)
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    return jnp.stack([top, bottom, left, right]).astype(jnp.int32)


def sample_mix(
    key: jax.Array,
    height: int,
    width: int,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float = 1.0,
    switch_prob: float = 0.5,
) -> MixParams:
    """Draws one batch's :class:`MixParams` (alphas and probabilities are static floats; an
    alpha of 0 disables that kind of mixing, both 0 or ``prob`` 0 give ``lam = 1``)."""
    k_apply, k_switch, k_lam, k_box = jax.random.split(key, 4)
    one = jnp.ones((), jnp.float32)
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or prob <= 0:
        return MixParams(one, jnp.zeros((), bool), jnp.zeros((4,), jnp.int32))
    apply = jax.random.bernoulli(k_apply, prob)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        cutmix = jax.random.bernoulli(k_switch, switch_prob)
    else:
        cutmix = jnp.asarray(cutmix_alpha > 0)
    # One Beta draw whose alpha follows the choice (a gamma sampler is slow to compile).
    alpha = jnp.where(cutmix, cutmix_alpha, mixup_alpha).astype(jnp.float32)
    lam = jax.random.beta(k_lam, alpha, alpha)
    cutmix = cutmix & apply
    box = jnp.where(cutmix, cutmix_box(k_box, height, width, lam), jnp.zeros((4,), jnp.int32))
    area = (box[1] - box[0]) * (box[3] - box[2])
    lam_box = 1.0 - area.astype(jnp.float32) / (height * width)
    lam = jnp.where(cutmix, lam_box, jnp.where(apply, lam, one))
    return MixParams(lam.astype(jnp.float32), cutmix, box)


def apply_mix(
    images: jax.Array, labels: jax.Array, params: MixParams, num_classes: int, smoothing: float
) -> tuple[jax.Array, jax.Array]:
    """Mixes ``images`` ``[batch, h, w, c]`` with the reversed batch per ``params``.

    Returns ``(images [batch, h, w, c], targets [batch, num_classes] float32)``."""
    chex.assert_rank(images, 4)
    chex.assert_shape(labels, (images.shape[0],))
    height, width = images.shape[1:3]
    flipped = images[::-1]
    top, bottom, left, right = params.box
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    pasted = jnp.where(inside[None, :, :, None], flipped, images)
    lam = params.lam.astype(images.dtype)
    blended = lam * images + (1.0 - lam) * flipped
    mixed = jnp.where(params.cutmix, pasted, blended)
    targets = smoothed_one_hot(labels, num_classes, smoothing)
    targets = params.lam * targets + (1.0 - params.lam) * targets[::-1]
    chex.assert_shape(targets, (images.shape[0], num_classes))
    return mixed, targets


def mix_batch(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    num_classes: int,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """:func:`sample_mix` then :func:`apply_mix`: ``(images, soft targets)`` of a batch."""
    params = sample_mix(key, images.shape[1], images.shape[2], mixup_alpha=mixup_alpha,
                        cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob)
    return apply_mix(images, labels, params, num_classes, smoothing)

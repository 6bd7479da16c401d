"""Patch masks for masked image modelling, generated on the device with per-example keys.

Two families:

- **Fixed-count masks** (MAE): every example masks exactly ``num_masked`` of its ``N`` patches,
  so the encoder's input of visible tokens has a static shape. :func:`shuffle_mask` gives the
  permutation of MAE's code: ``ids_shuffle = argsort(score)`` keeps the ``N - num_masked``
  lowest-scoring patches, ``ids_restore = argsort(ids_shuffle)`` puts tokens back in order.
  The score is uniform noise for ``random`` masking (He et al. 2022, Sec. 3), and noise plus a
  pattern for ``block`` (BEiT's blockwise patches masked first) and ``grid`` (keep one patch of
  every 2x2 cell), the strategies of the MAE paper's ablation (Fig. 6).
- **Blockwise masks** (BEiT, Bao et al. 2022, Algorithm 1): blocks of at least ``min_block``
  patches with aspect ratios in ``[min_aspect, 1 / min_aspect]`` are added until about
  ``num_masked`` patches are masked; a block is accepted only if it adds patches and does not
  overshoot, so the count never exceeds ``num_masked`` (:func:`block_mask`; iBOT draws the
  target per image, so it may be a traced number, 0 for no mask).
- **Mask-patch masks** (SimMIM, Xie et al. 2022): ``ceil(ratio * M)`` of the ``M`` squares of a
  coarser mask-patch grid are masked at random, each covering ``(mask_patch / patch)^2`` model
  patches (:func:`mask_patch_mask`).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

MASK_KINDS = ("random", "block", "grid")


def num_masked_patches(num_patches: int, ratio: float) -> int:
    """``int(N * ratio)`` as MAE's ``len_keep = int(N * (1 - ratio))``; ratio in (0, 1)."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio {ratio} must be in (0, 1), e.g. 0.75 for MAE.")
    keep = int(num_patches * (1 - ratio))
    if keep < 1 or keep >= num_patches:
        raise ValueError(
            f"mask ratio {ratio} of {num_patches} patches keeps {keep}: at least one patch must "
            "stay visible and one be masked; change the ratio or the patch grid.")
    return num_patches - keep


def _block_step(key, mask, grid, num_masked, min_block, log_aspect, attempts):
    """One round of BEiT's sampler: up to ``attempts`` proposals, the first that adds patches
    without exceeding ``num_masked`` is applied. ``mask [rows, cols]`` bool."""
    rows, cols = grid
    rr = jnp.arange(rows)[:, None]
    cc = jnp.arange(cols)[None, :]

    def propose(carry, k):
        mask, done = carry
        remaining = num_masked - jnp.sum(mask)
        k_area, k_aspect, k_top, k_left = jax.random.split(k, 4)
        area = jax.random.uniform(k_area, minval=min_block,
                                  maxval=jnp.maximum(remaining, min_block))
        aspect = jnp.exp(jax.random.uniform(k_aspect, minval=log_aspect[0], maxval=log_aspect[1]))
        h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
        w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
        fits = (h < rows) & (w < cols) & (h > 0) & (w > 0)
        top = jax.random.randint(k_top, (), 0, jnp.maximum(rows - h + 1, 1))
        left = jax.random.randint(k_left, (), 0, jnp.maximum(cols - w + 1, 1))
        block = (rr >= top) & (rr < top + h) & (cc >= left) & (cc < left + w)
        added = jnp.sum(block & ~mask)
        accept = ~done & fits & (added > 0) & (added <= remaining)
        return (jnp.where(accept, mask | block, mask), done | accept), None

    (mask, accepted), _ = jax.lax.scan(propose, (mask, jnp.array(False)),
                                       jax.random.split(key, attempts))
    return mask, accepted


def block_mask(
    key: jax.Array, grid: tuple[int, int], num_masked: int, min_block: int = 16,
    min_aspect: float = 0.3, attempts: int = 10, max_rounds: int | None = None,
) -> jax.Array:
    """BEiT's blockwise mask of one image: ``[rows, cols]`` bool, True = masked.

    Rounds of :func:`_block_step` run until ``num_masked`` patches are masked or a round adds
    nothing (as BEiT's ``MaskingGenerator``); the count is at most ``num_masked``. A traced
    ``num_masked`` (iBOT's per-image ``ratio * N``, a float) is not checked; 0 masks nothing."""
    rows, cols = grid
    if isinstance(num_masked, (int, float)) and not 0 < num_masked < rows * cols:
        raise ValueError(f"num_masked={num_masked} must be in (0, {rows * cols}) for a "
                         f"{rows}x{cols} grid.")
    if not 0 < min_aspect <= 1:
        raise ValueError(f"min_aspect={min_aspect} must be in (0, 1].")
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    max_rounds = max_rounds or rows * cols

    def cond(carry):
        mask, progressed, rounds, _ = carry
        return progressed & (jnp.sum(mask) < num_masked) & (rounds < max_rounds)

    def body(carry):
        mask, _, rounds, key = carry
        key, sub = jax.random.split(key)
        mask, accepted = _block_step(sub, mask, grid, num_masked, min_block, log_aspect, attempts)
        return mask, accepted, rounds + 1, key

    init = (jnp.zeros(grid, bool), jnp.array(True), jnp.array(0), key)
    mask, _, _, _ = jax.lax.while_loop(cond, body, init)
    return mask


def grid_pattern(grid: tuple[int, int]) -> jax.Array:
    """``[rows, cols]`` bool, True = masked: all but the top-left patch of every 2x2 cell."""
    rows, cols = grid
    keep = (jnp.arange(rows)[:, None] % 2 == 0) & (jnp.arange(cols)[None, :] % 2 == 0)
    return ~keep


def shuffle_mask(
    key: jax.Array, batch: int, grid: tuple[int, int], ratio: float, kind: str = "random",
    min_block: int = 16,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """MAE's per-example masking with exactly ``num_masked_patches(N, ratio)`` masked patches.

    Returns ``(ids_keep [batch, N_keep], mask [batch, N], ids_restore [batch, N])``: the indices
    of the visible patches (in shuffled order), the binary mask (1 = masked, in patch order) and
    the permutation that puts ``[visible; masked]`` tokens back in patch order.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind {kind!r} is unknown; use one of {MASK_KINDS}.")
    n = grid[0] * grid[1]
    num_masked = num_masked_patches(n, ratio)
    k_noise, k_pattern = jax.random.split(key)
    score = jax.random.uniform(k_noise, (batch, n))  # small noise: kept first (MAE's code)
    if kind == "block":
        keys = jax.random.split(k_pattern, batch)
        pattern = jax.vmap(lambda k: block_mask(k, grid, num_masked, min_block))(keys)
        score = score + pattern.reshape(batch, n)  # blocks are masked first, then random fill
    elif kind == "grid":
        score = score + grid_pattern(grid).reshape(1, n)
    ids_shuffle = jnp.argsort(score, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    ids_keep = ids_shuffle[:, : n - num_masked]
    mask = (ids_restore >= n - num_masked).astype(jnp.float32)
    chex.assert_shape([mask, ids_restore], (batch, n))
    return ids_keep, mask, ids_restore


def gather_tokens(tokens: jax.Array, ids: jax.Array) -> jax.Array:
    """``tokens [batch, n, d]``, ``ids [batch, m]`` -> ``[batch, m, d]`` (per-example gather)."""
    chex.assert_rank([tokens, ids], [3, 2])
    return jnp.take_along_axis(tokens, ids[:, :, None], axis=1)


def mask_patch_mask(key: jax.Array, batch: int, image_size: int, mask_patch: int,
                    model_patch: int, ratio: float) -> jax.Array:
    """SimMIM's ``MaskGenerator`` per example: ``[batch, (image_size / model_patch)^2]`` bool
    (True = masked, model patches row-major).

    The image is cut into ``M = (image_size / mask_patch)^2`` mask patches, exactly
    ``ceil(M * ratio)`` of them are masked (a random subset per example), and each masked mask
    patch masks the ``(mask_patch / model_patch)^2`` model patches it covers."""
    if image_size % mask_patch or mask_patch % model_patch:
        raise ValueError(f"mask patches of {mask_patch} px must tile the {image_size}-px image "
                         f"and be a multiple of the model's {model_patch}-px patch.")
    side, scale = image_size // mask_patch, mask_patch // model_patch
    count = math.ceil(side * side * ratio)
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(key, (batch, side * side)), axis=1), axis=1)
    coarse = (rank < count).reshape(batch, side, side)
    fine = jnp.repeat(jnp.repeat(coarse, scale, axis=1), scale, axis=2)
    return fine.reshape(batch, -1)

"""Augmentations as jittable JAX functions that run on the accelerator.

The per-example primitives take ONE float32 image `[height, width, 3]` in [0, 1] and its own
PRNG key; a batch is handled with `jax.vmap` over `jax.random.split(key, batch)`, so every
example draws its own parameters and the code works unchanged on inputs sharded over the batch
axis of a mesh. Semantics follow torchvision (the reference implementations of SimCLR, BYOL and
DINO): RandomResizedCrop, RandomHorizontalFlip, ColorJitter (multiplicative brightness, contrast
and saturation blends, additive hue shift, the four ops in a random order), RandomGrayscale,
GaussianBlur (reflect padding) and RandomSolarize.

`augment_view` chains them into one view of a batch, driven by a `presets.view_config()` ConfigDict:
crop, flip, colour jitter, grayscale, blur, solarize.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import chex
import dm_pix
import jax
import jax.numpy as jnp

# view_config: re-exported for ssl_jax/finetune.py (its owner moves it to ssl_jax.presets)
from ssl_jax.presets import (  # noqa: F401
    JITTER_KEYS,
    VIEW_OPTIONAL_KEYS,
    check_range,
    validate_view_config,
    view_config,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)
MAX_CROP_ATTEMPTS = 10

Array = jax.Array


def _check_image(image: Array) -> None:
    chex.assert_rank(image, 3)
    chex.assert_axis_dimension(image, -1, 3)


def _check_probability(name: str, p: Any) -> None:
    if isinstance(p, (int, float)) and not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}={p!r} is not a probability: pass a value in [0, 1].")


def _never(p: Any) -> bool:
    """True when `p` is a static zero probability, so the op can be skipped at trace time."""
    return isinstance(p, (int, float)) and p == 0


def crop_box(
    key: Array,
    height: int | Array,
    width: int | Array,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> Array:
    """Samples a crop box as torchvision's `RandomResizedCrop.get_params`.

    Up to `MAX_CROP_ATTEMPTS` candidates draw an area fraction `a ~ U(scale)` and an aspect ratio
    `r = exp(U(log ratio))`, giving `w = round(sqrt(a H W r))`, `h = round(sqrt(a H W / r))`; the
    first candidate that fits is placed uniformly at random. When none fits, the central crop of
    the whole image clipped to the ratio range is used. All candidates are drawn at once so the
    box is a traced value and the function jits and vmaps; `height` and `width` may be traced
    too (the size of an image's content within a padded canvas, `data.train_region='whole'`).

    Returns:
      int32 `[4]`: `(top, left, crop_height, crop_width)` in pixels.
    """
    check_range("scale", scale)
    check_range("ratio", ratio)
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = height * width
    shape = (MAX_CROP_ATTEMPTS,)
    target_area = area * jax.random.uniform(k_area, shape, minval=scale[0], maxval=scale[1])
    log_ratio = jax.random.uniform(
        k_ratio, shape, minval=math.log(ratio[0]), maxval=math.log(ratio[1])
    )
    aspect = jnp.exp(log_ratio)
    w = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(fits)

    height_f, width_f = jnp.asarray(height, jnp.float32), jnp.asarray(width, jnp.float32)
    in_ratio = width_f / height_f
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fallback_w = jnp.where(wide, jnp.round(height_f * max(ratio)), width_f).astype(jnp.int32)
    fallback_h = jnp.where(narrow, jnp.round(width_f / min(ratio)), height_f).astype(jnp.int32)

    found = jnp.any(fits)
    crop_h = jnp.where(found, h[first], fallback_h)
    crop_w = jnp.where(found, w[first], fallback_w)
    top = jax.random.randint(k_top, (), 0, height - crop_h + 1)
    left = jax.random.randint(k_left, (), 0, width - crop_w + 1)
    top = jnp.where(found, top, (height - crop_h) // 2)
    left = jnp.where(found, left, (width - crop_w) // 2)
    return jnp.stack([top, left, crop_h, crop_w]).astype(jnp.int32)


def resized_crop(image: Array, box: Array, size: int) -> Array:
    """Resamples the region `box = (top, left, h, w)` of `image` to `[size, size, 3]`.

    Bilinear with antialiasing when downscaling (`jax.image.scale_and_translate`), half-pixel
    centres as torchvision's resize: output pixel `x` samples input `left + (x + 0.5) w / size`.
    Unlike cropping then resizing, the filter may read the pixels just outside the box.
    """
    _check_image(image)
    box = box.astype(jnp.float32)
    scale = jnp.stack([size / box[2], size / box[3]])
    translation = -box[:2] * scale
    out = jax.image.scale_and_translate(
        image.astype(jnp.float32),
        (size, size, image.shape[-1]),
        (0, 1),
        scale,
        translation,
        method="linear",
        antialias=True,
    )
    return jnp.clip(out, 0.0, 1.0)


def random_resized_crop(key: Array, image: Array, size: int, scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3), image_hw: Array | None = None
                        ) -> Array:
    """Random crop of `image` `[height, width, 3]` resized to `[size, size, 3]` (see `crop_box`).
    `image_hw`: int `[2]`, the content's size at the top left of a padded `image`; the crop is
    drawn within it. None: the whole `image`."""
    _check_image(image)
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size={size!r} must be a positive int (the output side in pixels).")
    height, width = image.shape[:2] if image_hw is None else (image_hw[0], image_hw[1])
    box = crop_box(key, height, width, scale, ratio)
    return resized_crop(image, box, size)


def random_flip(key: Array, image: Array, p: float = 0.5) -> Array:
    """Horizontal flip of `image` `[height, width, 3]` with probability `p`."""
    _check_image(image)
    _check_probability("p", p)
    return jnp.where(jax.random.bernoulli(key, p), image[:, ::-1], image)


def rgb_to_luma(image: Array) -> Array:
    """Luma `0.2989 R + 0.587 G + 0.114 B` of `[..., 3]`, shape `[...]`."""
    return image @ jnp.asarray(LUMA_WEIGHTS, image.dtype)


def _blend(image: Array, factor: Array | float, target: Array | float) -> Array:
    """torchvision's `_blend`: `clip(factor * x + (1 - factor) * target, 0, 1)`."""
    return jnp.clip(factor * image + (1.0 - factor) * target, 0.0, 1.0)


def _mean_luma(image: Array) -> Array:
    """Mean luma of `[..., height, width, 3]`, shape `[..., 1, 1, 1]`."""
    return jnp.mean(rgb_to_luma(image), axis=(-2, -1), keepdims=True)[..., None]


def adjust_brightness(image: Array, factor: Array | float) -> Array:
    """`clip(factor * x)`: torchvision's brightness, a blend with black."""
    return _blend(image, factor, 0.0)


def adjust_contrast(image: Array, factor: Array | float) -> Array:
    """`clip(factor * x + (1 - factor) * m)`, `m` the mean luma of the image `[h, w, 3]`."""
    return _blend(image, factor, _mean_luma(image))


def adjust_saturation(image: Array, factor: Array | float) -> Array:
    """`clip(factor * x + (1 - factor) * luma(x))`: a blend with the grayscale image."""
    return _blend(image, factor, rgb_to_luma(image)[..., None])


def adjust_hue(image: Array, delta: Array | float) -> Array:
    """Rotates the HSV hue by `delta` (in turns, `h <- (h + delta) mod 1`), as torchvision."""
    return jnp.clip(dm_pix.adjust_hue(image, delta), 0.0, 1.0)


def jitter_strengths(
    strength: float,
    brightness: float | None = None,
    contrast: float | None = None,
    saturation: float | None = None,
    hue: float | None = None,
) -> tuple[float, float, float, float]:
    """SimCLR's `(0.8 s, 0.8 s, 0.8 s, 0.2 s)`, each replaced by its explicit value if given."""
    if strength < 0:
        raise ValueError(f"colour jitter strength={strength} must be >= 0 (0 disables it).")
    derived = (0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)
    explicit = (brightness, contrast, saturation, hue)
    values = tuple(d if e is None else float(e) for d, e in zip(derived, explicit, strict=True))
    for name, value in zip(("brightness", "contrast", "saturation", "hue"), values, strict=True):
        if value < 0:
            raise ValueError(f"colour jitter {name}={value} must be >= 0.")
    if values[3] > 0.5:
        raise ValueError(f"colour jitter hue={values[3]} must be in [0, 0.5] (turns of the wheel).")
    return values  # type: ignore[return-value]


def color_jitter(
    key: Array,
    image: Array,
    strength: float = 1.0,
    p: float = 0.8,
    *,
    brightness: float | None = None,
    contrast: float | None = None,
    saturation: float | None = None,
    hue: float | None = None,
    random_order: bool = True,
) -> Array:
    """torchvision's `RandomApply([ColorJitter(b, c, s, h)], p)` on `[height, width, 3]`.

    With SimCLR strength `s`: brightness = contrast = saturation = 0.8 s, hue = 0.2 s; explicit
    values override (DINO: 0.4, 0.4, 0.2, 0.1) and 0 disables an op. Factors as torchvision:
    brightness, contrast, saturation ~ U[max(0, 1 - v), 1 + v], hue shift ~ U[-h, h] turns. The
    enabled ops run in a random order per example, as torchvision (`random_order=False`: brightness,
    contrast, saturation, hue), each clipped to [0, 1]. The whole jitter applies with probability p.
    """
    _check_image(image)
    _check_probability("p", p)
    values = jitter_strengths(strength, brightness, contrast, saturation, hue)
    enabled = [op for op, v in enumerate(values) if v > 0]
    if not enabled or _never(p):
        return image
    k_apply, k_order, k_factor, k_hue = jax.random.split(key, 4)
    low = jnp.asarray([max(0.0, 1.0 - v) for v in values[:3]])
    factors = jax.random.uniform(k_factor, (3,), minval=low, maxval=1.0 + jnp.asarray(values[:3]))
    delta = jax.random.uniform(k_hue, (), minval=-values[3], maxval=values[3])
    order = jnp.asarray(enabled, jnp.int32)
    if random_order:
        order = jax.random.permutation(k_order, order)

    jittered = image
    for step in range(len(enabled)):
        jittered = _jitter_step(jittered, order[step], factors, delta, with_hue=values[3] > 0)
    return jnp.where(jax.random.bernoulli(k_apply, p), jittered, image)


def _jitter_step(image: Array, op: Array, factors: Array, delta: Array, with_hue: bool) -> Array:
    """Op `op` of (brightness, contrast, saturation, hue), chosen by a traced index.

    The first three share one blend whose target (black, mean luma, luma) is selected, so a
    vmapped random order costs one blend and one hue rotation per step, not four ops.
    """
    luma = rgb_to_luma(image)[..., None]
    target = jnp.where(op == 0, 0.0, jnp.where(op == 1, _mean_luma(image), luma))
    blended = _blend(image, factors[jnp.minimum(op, 2)], target)
    if not with_hue:
        return blended
    return jnp.where(op == 3, adjust_hue(image, delta), blended)


def random_grayscale(key: Array, image: Array, p: float = 0.2) -> Array:
    """With probability `p`, replaces `[height, width, 3]` by its luma in 3 equal channels."""
    _check_image(image)
    _check_probability("p", p)
    gray = jnp.broadcast_to(rgb_to_luma(image)[..., None], image.shape)
    return jnp.where(jax.random.bernoulli(key, p), gray, image)


def blur_kernel_size(side: int, rule: str = "simclr", sigma_max: float = 2.0) -> int:
    """The odd blur kernel for a `side`-pixel view by `rule` (`presets.BLUR_KERNELS`):

    - 'simclr': SimCLR's kernel of about 10% of the side, `2 * ((side // 10) // 2) + 1`, at
      least 3 taps (so small images still blur);
    - 'pil': PIL's GaussianBlur (DINO's), which has no cap: radius `ceil(3 * sigma_max)`, so
      the largest sigma keeps its full support (13 taps for sigma 2).

    Either way at most `2 * side - 1` (the reflect padding's limit).
    """
    if rule == "simclr":
        radius = max(1, (side // 10) // 2)
    elif rule == "pil":
        radius = max(1, math.ceil(3.0 * sigma_max))
    else:
        raise ValueError(f"blur kernel rule={rule!r} is unknown; use 'simclr' or 'pil'.")
    radius = min(radius, side - 1)
    return 2 * radius + 1


def _blur_axis(image: Array, weights: Array, axis: int) -> Array:
    radius = (weights.shape[0] - 1) // 2
    pad = [(0, 0)] * image.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(image, pad, mode="reflect")
    length = image.shape[axis]
    out = jnp.zeros_like(image)
    for tap in range(weights.shape[0]):
        out = out + weights[tap] * jax.lax.slice_in_dim(padded, tap, tap + length, axis=axis)
    return out


def gaussian_blur_fixed(image: Array, sigma: Array | float, kernel_size: int) -> Array:
    """Separable Gaussian blur of `[height, width, 3]` with reflect padding (torchvision).

    Kernel `g(x) = exp(-x^2 / (2 sigma^2)) / Z` for `x = -r..r`, `kernel_size = 2 r + 1`; `sigma`
    may be traced, `kernel_size` is static.
    """
    _check_image(image)
    if kernel_size % 2 != 1 or kernel_size // 2 >= min(image.shape[:2]):
        raise ValueError(
            f"kernel_size={kernel_size} must be odd and its radius smaller than the image side "
            f"{min(image.shape[:2])}; use blur_kernel_size(side)."
        )
    radius = kernel_size // 2
    x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    weights = jnp.exp(-(x**2) / (2.0 * jnp.asarray(sigma, jnp.float32) ** 2))
    weights = weights / jnp.sum(weights)
    return _blur_axis(_blur_axis(image, weights, 0), weights, 1)


def gaussian_blur(
    key: Array,
    image: Array,
    p: float,
    sigma: Sequence[float] = (0.1, 2.0),
    kernel_size: int | None = None,
) -> Array:
    """With probability `p`, blurs `[height, width, 3]` with `sigma ~ U(sigma)`.

    `kernel_size` defaults to `blur_kernel_size(height)` (23 for 224 pixels).
    """
    _check_image(image)
    _check_probability("p", p)
    check_range("sigma", sigma)
    if _never(p):
        return image
    k_apply, k_sigma = jax.random.split(key)
    kernel_size = kernel_size or blur_kernel_size(image.shape[0])
    s = jax.random.uniform(k_sigma, (), minval=sigma[0], maxval=sigma[1])
    blurred = gaussian_blur_fixed(image, s, kernel_size)
    return jnp.where(jax.random.bernoulli(k_apply, p), blurred, image)


def solarize(key: Array, image: Array, p: float, threshold: float = 0.5) -> Array:
    """With probability `p`, `x -> 1 - x` where `x >= threshold` (torchvision RandomSolarize)."""
    _check_image(image)
    _check_probability("p", p)
    return jnp.where(jax.random.bernoulli(key, p), dm_pix.solarize(image, threshold), image)


def normalize(
    x: Array,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Array:
    """`(x - mean) / std` per channel of `[..., 3]` float images in [0, 1]."""
    chex.assert_axis_dimension(x, -1, len(mean))
    x = jnp.asarray(x, jnp.float32)
    return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def denormalize(x: Array) -> Array:
    """Inverse of `normalize` (ImageNet statistics), clipped to [0, 1] for display."""
    return jnp.clip(x * jnp.asarray(IMAGENET_STD) + jnp.asarray(IMAGENET_MEAN), 0.0, 1.0)


def jitter_values(cfg: Any) -> tuple[float, float, float, float]:
    """A view config's (brightness, contrast, saturation, hue) jitter strengths."""
    return jitter_strengths(cfg.color_jitter, *(getattr(cfg, k, None) for k in JITTER_KEYS))


def _augment_example(key: Array, image: Array, image_hw: Array | None, cfg: Any) -> Array:
    k_crop, k_flip, k_jitter, k_gray, k_blur, k_solarize = jax.random.split(key, 6)
    x = random_resized_crop(k_crop, image, cfg.size, cfg.crop_scale, cfg.crop_ratio, image_hw)
    if cfg.flip:
        x = random_flip(k_flip, x)
    if cfg.color_jitter > 0 and cfg.color_jitter_p > 0:
        b, c, s, h = jitter_values(cfg)
        x = color_jitter(k_jitter, x, p=cfg.color_jitter_p, brightness=b, contrast=c,
                         saturation=s, hue=h)
    if cfg.grayscale_p > 0:
        x = random_grayscale(k_gray, x, cfg.grayscale_p)
    if cfg.blur_p > 0:
        rule = getattr(cfg, "blur_kernel", VIEW_OPTIONAL_KEYS["blur_kernel"])
        kernel = blur_kernel_size(cfg.size, rule, cfg.blur_sigma[1])
        x = gaussian_blur(k_blur, x, cfg.blur_p, cfg.blur_sigma, kernel)
    if cfg.solarize_p > 0:
        x = solarize(k_solarize, x, cfg.solarize_p)
    return x


def to_float_image(images: Array) -> Array:
    """uint8 pixels -> float32 in [0, 1]; float input is cast to float32 as is."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"images have dtype {images.dtype}; pass uint8 pixels or floats in [0, 1]."
        )
    return images.astype(jnp.float32)


# Evaluation crop: the central 87.5% of the decoded image (224 of 256 on ImageNet), resized to
# the training crop size when the two differ.
CENTRE_CROP_FRACTION = 0.875


def eval_view(images: Array, crop_size: int, image_hw: Array | None = None) -> Array:
    """``[batch, s, s, 3]`` uint8 -> normalised ``[batch, crop, crop, 3]``: a centre crop of
    :data:`CENTRE_CROP_FRACTION` when the decoded image is larger than the crop, then resize.
    The view of evaluation, fine-tuning's test and the online probe: no randomness.
    ``image_hw`` (int32 ``[batch, 2]``, training data with ``train_region='whole'``): the size
    of each image's content at the top left of its canvas, whose centre square is used."""
    x = to_float_image(images)
    if image_hw is not None:
        hw = image_hw.astype(jnp.float32)
        side = jnp.minimum(hw[:, 0], hw[:, 1])
        keep = jnp.where(side > crop_size,
                         jnp.maximum(jnp.round(side * CENTRE_CROP_FRACTION), crop_size), side)
        boxes = jnp.stack([(hw[:, 0] - keep) / 2, (hw[:, 1] - keep) / 2, keep, keep], axis=-1)
        return normalize(jax.vmap(resized_crop, (0, 0, None))(x, boxes, crop_size))
    side = x.shape[1]
    if side > crop_size:
        keep = max(int(round(side * CENTRE_CROP_FRACTION)), crop_size)
        start = (side - keep) // 2
        x = x[:, start : start + keep, start : start + keep]
    if x.shape[1] != crop_size:
        x = jax.image.resize(x, (x.shape[0], crop_size, crop_size, 3), "bilinear")
    return normalize(x)


def augment_view(key: Array, images: Array, cfg: Any, image_hw: Array | None = None) -> Array:
    """One augmented view of a batch: crop, flip, colour jitter, grayscale, blur, solarize.

    Args:
      key: PRNG key; example `i` uses `jax.random.split(key, batch)[i]`.
      images: uint8 or float in [0, 1], `[batch, height, width, 3]`.
      cfg: a `presets.view_config()` (static: close over it or use functools.partial under jit).
      image_hw: int `[batch, 2]`: each image's content size at the top left of its padded
        canvas (the batch's ``image_hw`` field, ``data.train_region='whole'``); crops are
        drawn within it. None: the whole array is the image.

    Returns:
      float32 `[batch, size, size, 3]` in [0, 1].
    """
    validate_view_config(cfg)
    chex.assert_rank(images, 4)
    chex.assert_axis_dimension(images, -1, 3)
    images = to_float_image(images)
    keys = jax.random.split(key, images.shape[0])
    if image_hw is not None:
        chex.assert_shape(image_hw, (images.shape[0], 2))
    out = jax.vmap(functools.partial(_augment_example, cfg=cfg))(keys, images, image_hw)
    chex.assert_shape(out, (images.shape[0], cfg.size, cfg.size, 3))
    return out

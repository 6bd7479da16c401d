"""Tests for ssl_jax.data.augment against NumPy transcriptions of torchvision's formulas."""

import colorsys
import functools

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ssl_jax import presets
from ssl_jax.data import augment

BATCH = 8


def _images(seed=0, batch=BATCH, height=32, width=32):
    return np.random.RandomState(seed).rand(batch, height, width, 3).astype(np.float32)


def _same_image_batch(seed=0, height=32, width=32):
    return np.repeat(_images(seed, 1, height, width), BATCH, axis=0)


def _gradient_image(height, width):
    """Channel 0 is the x coordinate of the pixel centre / width, channel 1 the y one."""
    y, x = np.meshgrid(
        (np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij"
    )
    return np.stack([x, y, np.full_like(x, 0.5)], axis=-1).astype(np.float32)


def _batched(fn):
    """jit(vmap(fn)) over per-example keys split from one key."""

    @jax.jit
    def run(key, images):
        return jax.vmap(fn)(jax.random.split(key, images.shape[0]), images)

    return run


PRIMITIVES = {
    "crop": lambda k, x: augment.random_resized_crop(k, x, 24),
    "flip": augment.random_flip,
    "jitter": lambda k, x: augment.color_jitter(k, x, 1.0, p=0.5),
    "grayscale": lambda k, x: augment.random_grayscale(k, x, p=0.5),
    "blur": lambda k, x: augment.gaussian_blur(k, x, p=0.5),
    "solarize": lambda k, x: augment.solarize(k, x, p=0.5),
}


@pytest.mark.parametrize("name", sorted(PRIMITIVES))
def test_primitive_shape_range_determinism_and_randomness(name):
    run = _batched(PRIMITIVES[name])
    images = _same_image_batch()
    out = np.asarray(run(jax.random.key(1), images))
    size = 24 if name == "crop" else 32
    assert out.shape == (BATCH, size, size, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(out, np.asarray(run(jax.random.key(1), images)))
    assert not np.array_equal(out, np.asarray(run(jax.random.key(2), images)))
    # Identical inputs: examples differ only through their own keys.
    assert any(not np.array_equal(out[0], out[i]) for i in range(1, BATCH))


@pytest.mark.parametrize(
    "fn",
    [
        lambda k, x: augment.random_flip(k, x, p=0.0),
        lambda k, x: augment.color_jitter(k, x, 1.0, p=0.0),
        lambda k, x: augment.color_jitter(k, x, 0.0, p=1.0),
        lambda k, x: augment.random_grayscale(k, x, p=0.0),
        lambda k, x: augment.gaussian_blur(k, x, p=0.0),
        lambda k, x: augment.solarize(k, x, p=0.0),
    ],
)
def test_probability_zero_leaves_image_unchanged(fn):
    images = _images()
    np.testing.assert_array_equal(np.asarray(_batched(fn)(jax.random.key(0), images)), images)


def test_crop_full_scale_square_ratio_is_identity():
    images = _images()
    crop = _batched(lambda k, x: augment.random_resized_crop(k, x, 32, (1.0, 1.0), (1.0, 1.0)))
    np.testing.assert_allclose(np.asarray(crop(jax.random.key(0), images)), images, atol=1e-5)


def test_crop_box_matches_torchvision_rules():
    keys = jax.random.split(jax.random.key(3), 512)
    height, width, scale, ratio = 40, 24, (0.08, 1.0), (3 / 4, 4 / 3)
    sample = jax.jit(jax.vmap(lambda k: augment.crop_box(k, height, width, scale, ratio)))
    boxes = np.asarray(sample(keys))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all() and (h > 0).all()
    # Fallback: a centred crop of the whole width clipped to the ratio range (width/height = 0.6).
    fallback = (h == round(24 / 0.75)) & (w == 24) & (top == (40 - 32) // 2) & (left == 0)
    sampled = ~fallback
    area = h * w / (height * width)
    # Rounding each side to whole pixels moves the area by at most about one pixel row/column.
    slack = (h + w + 1) / (height * width)
    assert (area[sampled] >= scale[0] - slack[sampled]).all()
    assert (area[sampled] <= scale[1] + slack[sampled]).all()
    aspect = w / h
    assert (aspect[sampled] >= ratio[0] * (1 - 1 / h[sampled]) - 1 / h[sampled]).all()
    assert (aspect[sampled] <= ratio[1] * (1 + 1 / h[sampled]) + 1 / h[sampled]).all()
    assert len(set(map(tuple, boxes))) > 400


def test_crop_box_fallback_when_no_attempt_fits():
    # ratio >= 2 never fits a square at full scale: torchvision falls back to the central crop.
    sample = jax.jit(lambda k: augment.crop_box(k, 32, 32, (1.0, 1.0), (2.0, 3.0)))
    box = np.asarray(sample(jax.random.key(0)))
    np.testing.assert_array_equal(box, [8, 0, 16, 32])


def test_crop_resamples_box_of_non_square_image():
    height, width, size = 24, 40, 16
    image = _gradient_image(height, width)
    keys = jax.random.split(jax.random.key(5), 64)
    crop = jax.jit(jax.vmap(lambda k: augment.random_resized_crop(k, image, size, (0.3, 0.9))))
    out = np.asarray(crop(keys))
    sample = jax.jit(jax.vmap(lambda k: augment.crop_box(k, height, width, (0.3, 0.9))))
    boxes = np.asarray(sample(keys))
    assert out.shape == (64, size, size, 3)
    inner = slice(size // 4, 3 * size // 4)
    centres = (np.arange(size)[inner] + 0.5) / size
    for (top, left, h, w), view in zip(boxes, out, strict=True):
        # Output pixel x samples the ramp at left + (x + 0.5) w / size; the antialias filter's
        # discrete weights shift the result by a few hundredths of a pixel at most.
        expected_x, expected_y = (left + centres * w) / width, (top + centres * h) / height
        np.testing.assert_allclose(view[4, inner, 0], expected_x, atol=0.1 / width)
        np.testing.assert_allclose(view[inner, 4, 1], expected_y, atol=0.1 / height)


def test_crop_area_statistics_follow_scale_range():
    n, side, size, scale = 256, 64, 32, (0.1, 0.5)
    image = _gradient_image(side, side)
    keys = jax.random.split(jax.random.key(7), n)
    crop = jax.jit(jax.vmap(lambda k: augment.random_resized_crop(k, image, size, scale)))
    out = np.asarray(crop(keys))
    a, b = size // 4, 3 * size // 4
    # Slope of the ramp in the output = crop side / image side.
    width_frac = (out[:, size // 2, b, 0] - out[:, size // 2, a, 0]) * size / (b - a)
    height_frac = (out[:, b, size // 2, 1] - out[:, a, size // 2, 1]) * size / (b - a)
    area = width_frac * height_frac
    assert area.min() > scale[0] - 0.02 and area.max() < scale[1] + 0.02
    # With scale <= 0.5 and ratio <= 4/3 every first attempt fits: area ~ U(0.1, 0.5).
    assert abs(area.mean() - 0.3) < 0.03
    assert area.min() < 0.15 and area.max() > 0.45


def test_flip_matches_numpy():
    images = _images()
    flip = _batched(lambda k, x: augment.random_flip(k, x, p=1.0))
    np.testing.assert_array_equal(np.asarray(flip(jax.random.key(0), images)), images[:, :, ::-1])


def test_grayscale_matches_numpy_luma():
    images = _images()
    gray = np.asarray(
        _batched(lambda k, x: augment.random_grayscale(k, x, p=1.0))(jax.random.key(0), images)
    )
    luma = 0.2989 * images[..., 0] + 0.587 * images[..., 1] + 0.114 * images[..., 2]
    for c in range(3):
        np.testing.assert_allclose(gray[..., c], luma, atol=1e-6)


def _np_blend(img1, img2, ratio):
    """torchvision.transforms.functional_tensor._blend for float images."""
    return np.clip(ratio * img1 + (1.0 - ratio) * img2, 0.0, 1.0)


def _np_gray(img):
    return (0.2989 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2])[..., None]


@pytest.mark.parametrize("factor", [0.3, 1.0, 1.7])
def test_brightness_contrast_saturation_match_torchvision(factor):
    image = _images()[0]
    np.testing.assert_allclose(
        augment.adjust_brightness(image, factor),
        _np_blend(image, np.zeros_like(image), factor),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        augment.adjust_contrast(image, factor),
        _np_blend(image, np.mean(_np_gray(image)), factor),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        augment.adjust_saturation(image, factor),
        _np_blend(image, _np_gray(image), factor),
        atol=1e-6,
    )


@pytest.mark.parametrize("delta", [0.1, -0.3, 0.5])
def test_hue_matches_colorsys(delta):
    image = _images(1, 1, 8, 8)[0]
    expected = np.array(
        [
            colorsys.hsv_to_rgb((h + delta) % 1.0, s, v)
            for h, s, v in (colorsys.rgb_to_hsv(*p) for p in image.reshape(-1, 3))
        ]
    ).reshape(image.shape)
    np.testing.assert_allclose(augment.adjust_hue(image, delta), expected, atol=1e-5)


def test_brightness_only_jitter_factor_range():
    images = _images() * 0.5  # factor <= 1.8 keeps every pixel below 1: no clipping.
    jitter = _batched(
        lambda k, x: augment.color_jitter(
            k, x, p=1.0, brightness=0.8, contrast=0.0, saturation=0.0, hue=0.0
        )
    )
    out = np.asarray(jitter(jax.random.key(0), images))
    ratio = out / np.maximum(images, 1e-6)
    factors = ratio[:, 0, 0, 0]
    np.testing.assert_allclose(ratio, factors[:, None, None, None] * np.ones_like(ratio), rtol=1e-4)
    assert (factors >= 0.2 - 1e-6).all() and (factors <= 1.8 + 1e-6).all()
    assert np.ptp(factors) > 0.3


_BLEND_TARGETS = {
    "brightness": lambda x: np.zeros_like(x),
    "contrast": lambda x: np.broadcast_to(
        np.mean(_np_gray(x), axis=(1, 2, 3), keepdims=True), x.shape
    ),
    "saturation": lambda x: np.broadcast_to(_np_gray(x), x.shape),
}


@pytest.mark.parametrize("op", sorted(_BLEND_TARGETS))
def test_single_op_jitter_is_torchvision_blend_with_factor_in_range(op):
    # Pixels in [0.4, 0.6] and factors in [0.5, 1.5] never clip, so the factor can be read back.
    images = 0.4 + 0.2 * _images()
    strengths = {k: 0.0 for k in ("brightness", "contrast", "saturation", "hue")} | {op: 0.5}
    jitter = _batched(lambda k, x: augment.color_jitter(k, x, p=1.0, **strengths))
    out = np.asarray(jitter(jax.random.key(4), images), np.float64)
    target = _BLEND_TARGETS[op](images.astype(np.float64))
    factors = (out[:, 0, 0, 0] - target[:, 0, 0, 0]) / (images[:, 0, 0, 0] - target[:, 0, 0, 0])
    assert (factors >= 0.5 - 1e-3).all() and (factors <= 1.5 + 1e-3).all() and np.ptp(factors) > 0.2
    expected = factors[:, None, None, None] * images + (1 - factors[:, None, None, None]) * target
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_hue_only_jitter_keeps_channel_max_and_min():
    # A hue rotation keeps each pixel's largest and smallest channel (HSV value and chroma).
    images = _images()
    jitter = _batched(
        lambda k, x: augment.color_jitter(
            k, x, p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.5
        )
    )
    out = np.asarray(jitter(jax.random.key(2), images))
    np.testing.assert_allclose(out.max(-1), images.max(-1), atol=1e-5)
    np.testing.assert_allclose(out.min(-1), images.min(-1), atol=1e-5)
    assert np.abs(out - images).max() > 0.1


def test_jitter_random_order_changes_the_result():
    # The order key is separate from the factor keys: with the same key only the order differs.
    images = _images()
    shuffled = _batched(lambda k, x: augment.color_jitter(k, x, 1.0, p=1.0))
    ordered = _batched(lambda k, x: augment.color_jitter(k, x, 1.0, p=1.0, random_order=False))
    a = np.asarray(shuffled(jax.random.key(6), images))
    b = np.asarray(ordered(jax.random.key(6), images))
    differs = [not np.allclose(a[i], b[i], atol=1e-4) for i in range(BATCH)]
    assert any(differs)


def test_jitter_rejects_bad_strengths():
    image = _images()[0]
    with pytest.raises(ValueError, match="hue"):
        augment.color_jitter(jax.random.key(0), image, hue=0.7)
    with pytest.raises(ValueError, match="p="):
        augment.color_jitter(jax.random.key(0), image, p=1.5)


def test_solarize_matches_numpy():
    images = _images()
    out = _batched(lambda k, x: augment.solarize(k, x, p=1.0, threshold=0.4))(
        jax.random.key(0), images
    )
    np.testing.assert_array_equal(np.asarray(out), np.where(images >= 0.4, 1.0 - images, images))


def _np_blur(image, sigma, kernel_size):
    r = kernel_size // 2
    x = np.arange(-r, r + 1)
    g = np.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()
    padded = np.pad(image.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
    out = np.zeros(image.shape)
    h, w = image.shape[:2]
    for i in range(kernel_size):
        for j in range(kernel_size):
            out += g[i] * g[j] * padded[i : i + h, j : j + w]
    return out


def test_blur_matches_numpy_reference():
    image = _images()[0]
    np.testing.assert_allclose(
        augment.gaussian_blur_fixed(image, 1.3, 5), _np_blur(image, 1.3, 5), atol=1e-5
    )


def test_blur_preserves_constant_image_and_mean():
    blur = _batched(lambda k, x: augment.gaussian_blur(k, x, p=1.0, kernel_size=7))
    constant = np.full((BATCH, 32, 32, 3), 0.37, np.float32)
    np.testing.assert_allclose(np.asarray(blur(jax.random.key(0), constant)), constant, atol=1e-6)
    images = _images()
    out = np.asarray(blur(jax.random.key(0), images))
    np.testing.assert_allclose(out.mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=5e-3)
    assert out.std() < images.std()


def test_blur_kernel_size_is_about_ten_percent_and_odd():
    assert augment.blur_kernel_size(224) == 23
    assert augment.blur_kernel_size(96) == 9
    assert augment.blur_kernel_size(32) == 3
    with pytest.raises(ValueError, match="kernel_size"):
        augment.gaussian_blur_fixed(_images()[0], 1.0, 4)


def test_normalize_matches_numpy():
    images = _images()
    mean, std = np.array(augment.IMAGENET_MEAN), np.array(augment.IMAGENET_STD)
    np.testing.assert_allclose(augment.normalize(images), (images - mean) / std, atol=1e-6)


def _view(cfg):
    return jax.jit(functools.partial(augment.augment_view, cfg=cfg))


# Every op on; compiled once and shared by the tests below.
_FULL_VIEW = _view(presets.view_config(size=16, solarize_p=0.2))


def test_augment_view_shape_range_and_randomness():
    images = (_same_image_batch(height=24, width=20) * 255).astype(np.uint8)
    view = _FULL_VIEW
    out = np.asarray(view(jax.random.key(0), images))
    assert out.shape == (BATCH, 16, 16, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(out, np.asarray(view(jax.random.key(0), images)))
    assert not np.allclose(out, np.asarray(view(jax.random.key(1), images)))
    assert all(not np.allclose(out[0], out[i]) for i in range(1, BATCH))


def test_uint8_and_float_inputs():
    pixels = (_images() * 255).astype(np.uint8)
    np.testing.assert_allclose(augment.to_float_image(pixels), pixels / 255.0, atol=1e-7)
    floats = _images()
    assert augment.to_float_image(floats.astype(np.float16)).dtype == np.float32
    with pytest.raises(ValueError, match="dtype"):
        augment.to_float_image(pixels.astype(np.int32))


def test_augment_view_with_everything_off_is_identity():
    cfg = presets.view_config(
        size=32,
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        flip=False,
        color_jitter=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
    )
    images = _images()
    np.testing.assert_allclose(np.asarray(_view(cfg)(jax.random.key(0), images)), images, atol=1e-5)


def test_view_config_defaults_and_overrides():
    cfg = presets.view_config()
    assert cfg.size == 224 and cfg.crop_scale == (0.08, 1.0) and cfg.flip is True
    assert (cfg.color_jitter, cfg.color_jitter_p, cfg.grayscale_p) == (1.0, 0.8, 0.2)
    assert (cfg.blur_p, cfg.blur_sigma, cfg.solarize_p) == (0.5, (0.1, 2.0), 0.0)
    assert cfg.hue is None
    dino = presets.view_config(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    assert augment.jitter_strengths(1.0, 0.4, 0.4, 0.2, 0.1) == (0.4, 0.4, 0.2, 0.1)
    assert (dino.brightness, dino.hue) == (0.4, 0.1)
    assert augment.jitter_strengths(0.5) == (0.4, 0.4, 0.4, 0.1)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"sise": 32}, "sise"),
        ({"blur_p": 1.5}, "blur_p"),
        ({"grayscale_p": -0.1}, "grayscale_p"),
        ({"crop_scale": (0.5, 0.2)}, "crop_scale"),
        ({"crop_scale": (0.0, 1.0)}, "crop_scale"),
        ({"crop_ratio": (1.0,)}, "crop_ratio"),
        ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"),
        ({"size": 0}, "size"),
        ({"color_jitter": 0.0, "hue": 0.1}, "hue"),
        ({"hue": 0.8}, "hue"),
        ({"flip": 1}, "flip"),
        ({"blur_p": "half"}, "blur_p"),
    ],
)
def test_view_config_rejects_bad_values(overrides, key):
    with pytest.raises(ValueError, match=key):
        presets.view_config(**overrides)


def test_augment_view_rejects_bad_config_and_input():
    cfg = presets.view_config(size=16)
    cfg.solarize_threshold = 0.3  # a ConfigDict accepts new keys silently; augment_view must not
    with pytest.raises(ValueError, match="solarize_threshold"):
        augment.augment_view(jax.random.key(0), _images(), cfg)
    partial = ml_collections.ConfigDict({"size": 16})
    with pytest.raises(ValueError, match="crop_scale"):
        augment.augment_view(jax.random.key(0), _images(), partial)
    with pytest.raises(ValueError, match="dtype"):
        augment.augment_view(jax.random.key(0), _images().astype(np.int32), presets.view_config())


def test_augment_view_on_batch_sharded_mesh_matches_one_device():
    n = jax.device_count()
    assert n > 1 and BATCH % n == 0, "tests/conftest.py forces 8 CPU devices before JAX starts"
    images = (_images(5, height=24, width=20) * 255).astype(np.uint8)
    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))
    sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
    out = _FULL_VIEW(jax.random.key(0), sharded)
    assert len(out.sharding.device_set) == n
    single = _FULL_VIEW(jax.random.key(0), jax.device_put(images, jax.devices()[0]))
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), atol=1e-5)

"""Pictures of a frozen encoder for people to look at (PIL only).

Attention maps (as in DINO's Fig. 1): for a few test images, the attention of the cls token over
the patch grid in the last block of a ViT, one map per head. ``DIR/attention_step{N}.png`` has
one row per image: the image as the encoder saw it (the evaluation's centre crop), then one heat
map per head (each scaled to its own min-max, dark = low, bright = high, one square per patch).

Method pictures: a method with ``picture_panels(params, extra, images, rng)`` (MAE: original,
masked input, reconstruction) gets ``DIR/reconstruction_step{N}.png``, one row per test image
and one column per panel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from PIL import Image

from ssl_jax import parallel
from ssl_jax.data import augment, pipeline
from ssl_jax.evaluate.features import eval_view

# Anchors of a perceptually ordered dark-to-bright map (close to matplotlib's 'inferno').
COLOR_ANCHORS = np.array(
    [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
     (250, 193, 39), (252, 255, 164)], np.float64)
TILE = 96  # pixels per picture tile
GAP = 2  # white pixels between tiles


def save_png(image: Image.Image, path: epath.PathLike) -> None:
    """Writes ``image`` as PNG through epath, so a ``gs://`` workdir works like a local one."""
    with epath.Path(path).open("wb") as f:
        image.save(f, format="PNG")


def colorize(values: np.ndarray) -> np.ndarray:
    """``[h, w]`` floats in [0, 1] -> ``[h, w, 3]`` uint8 through :data:`COLOR_ANCHORS`."""
    x = np.clip(np.asarray(values, np.float64), 0.0, 1.0) * (len(COLOR_ANCHORS) - 1)
    low = np.minimum(np.floor(x).astype(int), len(COLOR_ANCHORS) - 2)
    frac = (x - low)[..., None]
    rgb = COLOR_ANCHORS[low] * (1.0 - frac) + COLOR_ANCHORS[low + 1] * frac
    return np.round(rgb).astype(np.uint8)


def normalize_map(attention: np.ndarray) -> np.ndarray:
    """Min-max scaling of one map to [0, 1] (a constant map becomes 0)."""
    lo, hi = float(np.min(attention)), float(np.max(attention))
    return (attention - lo) / (hi - lo) if hi > lo else np.zeros_like(attention)


def cls_attention_maps(weights: jax.Array, grid: tuple[int, int], num_prefix: int) -> jax.Array:
    """The cls token's row of the attention weights on the patch grid.

    ``weights [batch, heads, tokens, tokens]`` (token 0 = cls, then ``num_prefix - 1`` other prefix
    tokens, then the patches row-major) -> ``[batch, heads, grid_h, grid_w]``.
    """
    chex.assert_rank(weights, 4)
    batch, heads = weights.shape[:2]
    chex.assert_axis_dimension(weights, 3, num_prefix + grid[0] * grid[1])
    return weights[:, :, 0, num_prefix:].reshape(batch, heads, *grid)


def attention_figure(images: np.ndarray, maps: np.ndarray, tile: int = TILE) -> Image.Image:
    """One row per image: the image, then one heat map per head.

    Args:
      images: ``[n, h, w, 3]`` uint8.
      maps: ``[n, heads, grid_h, grid_w]`` attention (any scale; each map is min-max scaled).
      tile: side of every tile in pixels; maps are enlarged with nearest neighbours so that each
        patch stays a visible square.
    """
    chex.assert_rank([images, maps], [4, 4])
    n, heads = maps.shape[:2]
    if images.shape[0] != n:
        raise ValueError(f"{images.shape[0]} images but attention maps of {n}")
    width = (heads + 1) * tile + heads * GAP
    height = n * tile + (n - 1) * GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    for row in range(n):
        top = row * (tile + GAP)
        picture = Image.fromarray(np.asarray(images[row], np.uint8))
        canvas.paste(picture.resize((tile, tile), Image.Resampling.BICUBIC), (0, top))
        for head in range(heads):
            heat = Image.fromarray(colorize(normalize_map(maps[row, head])))
            left = (head + 1) * (tile + GAP)
            canvas.paste(heat.resize((tile, tile), Image.Resampling.NEAREST), (left, top))
    return canvas


def attention_maps(encoder: Any, variables: Any, images: jax.Array, crop: int,
                   encoder_input: Callable[[jax.Array], jax.Array] | None = None) -> tuple:
    """``(maps [n, heads, gh, gw], crops [n, crop, crop, 3] uint8)`` of uint8 ``images``
    ``[n, s, s, 3]`` seen through the evaluation's centre crop (jittable); the encoder sees
    ``encoder_input`` of the crops (the method's, e.g. colorization's L channel; None: the
    crops)."""
    x = eval_view(images, crop)
    feed = encoder_input(x) if encoder_input is not None else x
    weights = encoder.apply(variables, feed, train=False, return_attention=True)
    grid = (crop // encoder.patch_size, crop // encoder.patch_size)
    maps = cls_attention_maps(weights, grid, encoder.num_prefix_tokens)
    pixels = jnp.round(augment.denormalize(x) * 255.0).astype(jnp.uint8)
    return maps, pixels


def write_attention_pictures(
    encoder: Any,
    variables: Any,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    workdir: epath.PathLike,
    step: int,
    num_images: int = 4,
    encoder_input: Callable[[jax.Array], jax.Array] | None = None,
) -> str | None:
    """Writes ``DIR/attention_step{step}.png`` for the first ``num_images`` test images (the
    encoder sees ``encoder_input`` of them: pass the method's).

    Every process runs the (sharded) forward pass; process 0 writes. Returns the path, or None
    when the encoder has no cls token to take the attention of."""
    if not getattr(encoder, "use_cls_token", False) or num_images <= 0:
        return None
    crop = config.aug.view1.size
    batch = next(iter(pipeline.eval_batches(
        config.data, config.data.test_split, batch_size=config.eval.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())))
    arrays = parallel.global_batch(batch, mesh)
    keep = min(num_images, config.eval.batch_size)

    @jax.jit
    def first_maps(variables, images, mask):
        maps, pixels = attention_maps(encoder, variables, images, crop, encoder_input)
        return maps[:keep], pixels[:keep], mask[:keep]

    out = multihost_utils.process_allgather(
        first_maps(variables, arrays["image"], arrays["mask"]), tiled=True)
    maps, pixels, mask = (np.asarray(a) for a in out)
    mask = mask.astype(bool)
    if not mask.any():
        return None
    path = epath.Path(workdir) / f"attention_step{step}.png"
    if parallel.is_main_process():
        save_png(attention_figure(pixels[mask], maps[mask]), path)
    return str(path)


def panels_figure(panels: dict[str, np.ndarray], tile: int = TILE) -> Image.Image:
    """One row per image, one column per panel; ``panels`` maps names to ``[n, h, w, 3]`` float
    images in [0, 1] (all with the same ``n``)."""
    columns = list(panels.values())
    n = columns[0].shape[0]
    canvas = Image.new("RGB", (len(columns) * (tile + GAP) - GAP, n * (tile + GAP) - GAP), "white")
    for row in range(n):
        for col, images in enumerate(columns):
            pixels = np.clip(np.round(np.asarray(images[row]) * 255.0), 0, 255).astype(np.uint8)
            tile_image = Image.fromarray(pixels).resize((tile, tile), Image.Resampling.NEAREST)
            canvas.paste(tile_image, (col * (tile + GAP), row * (tile + GAP)))
    return canvas


def write_method_pictures(
    method: Any, state: Any, config: ml_collections.ConfigDict, mesh: Mesh,
    workdir: epath.PathLike, step: int, num_images: int = 4,
) -> str | None:
    """Writes ``DIR/reconstruction_step{step}.png`` from ``method.picture_panels`` for the first
    ``num_images`` test images; None when the method has no pictures."""
    if not hasattr(method, "picture_panels") or num_images <= 0:
        return None
    batch = next(iter(pipeline.eval_batches(
        config.data, config.data.test_split, batch_size=config.eval.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())))
    arrays = parallel.global_batch(batch, mesh)
    keep = min(num_images, config.eval.batch_size)
    names: list[str] = []  # the method's column order (a dict leaving jit has sorted keys)

    @jax.jit
    def first_panels(params, extra, images, mask):
        x = eval_view(images, config.aug.view1.size)
        rng = jax.random.key(config.seed)
        panels = method.picture_panels(params, extra, x, rng)
        names[:] = list(panels)
        return [v[:keep] for v in panels.values()], mask[:keep]

    columns, mask = multihost_utils.process_allgather(
        first_panels(state["params"], state["extra"], arrays["image"], arrays["mask"]),
        tiled=True)
    mask = np.asarray(mask).astype(bool)
    if not mask.any():
        return None
    path = epath.Path(workdir) / f"reconstruction_step{step}.png"
    if parallel.is_main_process():
        panels = {name: np.asarray(c)[mask] for name, c in zip(names, columns, strict=True)}
        save_png(panels_figure(panels), path)
    return str(path)

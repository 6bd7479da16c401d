"""Multi-crop (Caron et al. 2020, SwAV; used by DINO) on the device.

Every image of a batch gives ``G`` global crops and ``L`` local crops, each an independent draw of
``augment.augment_view`` with its own view config (DINO: global crop 1 always blurred, global crop
2 rarely blurred and sometimes solarized, local crops small and blurred half of the time). Crops
of one image stay next to each other on the batch axis (``[batch, views, ...]``), so with the
batch sharded over a mesh each image's crops stay on the device that holds the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp

from ssl_jax.data import augment

Array = jax.Array


def global_view_config(index: int, global_views: Sequence[Any]) -> Any:
    """The view config of global crop ``index``: the configs are used in turn (crop 0 gets the
    first, crop 1 the second, crop 2 the first again, ...)."""
    return global_views[index % len(global_views)]


def multi_crop(
    key: Array,
    images: Array,
    global_views: Sequence[Any],
    num_global: int,
    local_view: Any | None = None,
    num_local: int = 0,
    normalize: bool = True,
    image_hw: Array | None = None,
) -> tuple[Array, Array | None]:
    """``num_global`` global and ``num_local`` local crops of every image.

    Args:
      key: PRNG key; every crop of every image draws its own augmentation parameters.
      images: uint8 or float in [0, 1], ``[batch, height, width, 3]``.
      global_views: view configs of the global crops, used in turn (see
        :func:`global_view_config`); all must have the same ``size``.
      num_global: number of global crops (>= 1).
      local_view: view config of the local crops (needed when ``num_local`` > 0).
      num_local: number of local crops (>= 0).
      normalize: apply ``augment.normalize`` (ImageNet mean and std).
      image_hw: int ``[batch, 2]``, the images' content within a padded canvas (the batch's
        ``image_hw`` field); None: the whole arrays.

    Returns:
      ``(globals [batch, num_global, Sg, Sg, 3], locals [batch, num_local, Sl, Sl, 3] or None)``
      float32, where ``Sg`` and ``Sl`` are the views' ``size``.
    """
    if num_global < 1:
        raise ValueError(f"num_global={num_global}: multi-crop needs at least one global crop.")
    if num_local < 0 or (num_local and local_view is None):
        raise ValueError(f"num_local={num_local} needs num_local >= 0 and a local_view config.")
    sizes = {v.size for v in global_views}
    if len(sizes) != 1:
        raise ValueError(f"global views have different sizes {sorted(sizes)}; use one size.")
    chex.assert_rank(images, 4)
    batch = images.shape[0]
    k_global, k_local = jax.random.split(key)
    finish = augment.normalize if normalize else (lambda x: x)
    keys = jax.random.split(k_global, num_global)
    crops = [augment.augment_view(keys[i], images, global_view_config(i, global_views),
                                  image_hw) for i in range(num_global)]
    globals_ = finish(jnp.stack(crops, axis=1))
    size = global_views[0].size
    chex.assert_shape(globals_, (batch, num_global, size, size, 3))
    if not num_local:
        return globals_, None
    local_keys = jax.random.split(k_local, num_local)
    locals_ = jax.vmap(lambda k: augment.augment_view(k, images, local_view, image_hw))(
        local_keys)
    locals_ = finish(jnp.swapaxes(locals_, 0, 1))
    chex.assert_shape(locals_, (batch, num_local, local_view.size, local_view.size, 3))
    return globals_, locals_


def flatten_views(crops: Array) -> Array:
    """``[batch, views, h, w, c] -> [batch * views, h, w, c]``, crops of image i in rows
    ``i * views ... i * views + views - 1``."""
    chex.assert_rank(crops, 5)
    return crops.reshape(-1, *crops.shape[2:])

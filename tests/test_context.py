"""Relative patch position: the 8 positions against a NumPy reference (each pair is the centre
patch and the neighbour its label names, with a gap and jitter, standardised), the colour
remedies (projection, dropping), the global batch's step (1 device vs 8), and bad input named
before compiling (exit code 2 from the command line)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import context as context_config
from ssl_jax import methods, parallel
from ssl_jax.config import ConfigError
from ssl_jax.data import tiles
from tests.method_steps import assert_train_refuses, set_key, step_on_1_and_8_devices

RUNLOCAL = "data=digits,runlocal"  # 4-px patches, a 2-px gap, +-1 px of jitter, an 18-px crop
# Doersch et al.'s labels, 0-based, as (row, column) offsets from the centre patch.
OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _config(arg=RUNLOCAL, **changes):
    config = context_config.get_config(arg)
    with config.unlocked():
        for key, value in changes.items():
            set_key(config, key, value)
    return config


def _standardize(x):
    return (x - x.mean()) / (x.std() + 1e-5)


def _find(patch, crop, rows, cols, size=4):
    """The (top, left) places among ``rows x cols`` where ``patch`` is the crop's patch."""
    side = crop.shape[0] - size
    return [(y, x) for y in rows for x in cols if 0 <= y <= side and 0 <= x <= side
            and np.allclose(patch, _standardize(crop[y:y + size, x:x + size]), atol=1e-4)]


def test_pairs_are_the_centre_and_the_labelled_neighbour():
    """Crop = image (20 px, no resize): the grid needs 18 px, so it starts at 0..2 in each
    direction. The centre patch lies at origin + 6 + 0..2 (stride 4 + 2, jitter 2 * 1); the
    neighbour of label y lies one stride away in the direction of OFFSETS[y], within the jitter
    and with at least gap - 2 jitter = 0 px between them, and never overlaps the centre."""
    config = _config(**{"context.crop_size": 20, "aug.view1.crop_scale": (1.0, 1.0),
                        "aug.view1.crop_ratio": (1.0, 1.0), "aug.view1.flip": False})
    method = methods.create(config, None)
    images = np.random.default_rng(0).integers(0, 256, (32, 20, 20, 3)).astype(np.uint8)
    pairs, labels = map(np.asarray, method.task(jax.random.key(0), jnp.asarray(images)))
    assert pairs.shape == (32, 2, 4, 4, 3) and labels.shape == (32,)
    assert set(labels.tolist()) == set(range(8))  # every position drawn in 32 pairs
    for i in range(32):
        crop = images[i] / 255.0
        centre = _find(pairs[i, 0], crop, range(6, 11), range(6, 11))
        assert len(centre) == 1
        (cy, cx), (dy, dx) = centre[0], OFFSETS[labels[i]]
        # The neighbour's cell corner is the centre's cell corner + 6 (dy, dx); each patch moved by
        # 0..2 within its cell: the neighbour is within +-2 of the centre's place + 6 (dy, dx).
        near = _find(pairs[i, 1], crop, range(cy + 6 * dy - 2, cy + 6 * dy + 3),
                     range(cx + 6 * dx - 2, cx + 6 * dx + 3))
        assert len(near) == 1, (i, labels[i])
        ny, nx = near[0]
        assert max(abs(ny - cy), abs(nx - cx)) >= 4  # never overlapping (gap 2 - jitter 2 * 1)


def test_colour_projection_and_dropping():
    rng = np.random.default_rng(1)
    pixels = rng.uniform(size=(5, 3)).astype(np.float32)
    axis = np.array([-1.0, 2.0, -1.0]) / np.sqrt(6)
    expected = pixels - np.outer(pixels @ axis, axis)  # the green-magenta component removed
    projected = np.asarray(tiles.project_green_magenta(jnp.asarray(pixels)))
    np.testing.assert_allclose(projected, expected, atol=1e-6)
    np.testing.assert_allclose(projected @ axis, 0, atol=1e-6)
    grey = np.full((2, 3), 0.4, np.float32)
    np.testing.assert_allclose(tiles.project_green_magenta(jnp.asarray(grey)), grey, atol=1e-6)

    patch = jnp.asarray(rng.uniform(size=(6, 6, 3)), jnp.float32)
    dropped = np.asarray(tiles.drop_colour(jax.random.key(3), patch))
    stds = dropped.std(axis=(0, 1))
    kept = int(np.argmax(stds))
    np.testing.assert_allclose(dropped[..., kept], _standardize(np.asarray(patch)[..., kept]),
                               atol=1e-4)
    assert np.all(np.delete(stds, kept) < 0.03)  # noise of about 1/100 the kept channel's std
    kept_channels = {int(np.argmax(np.asarray(tiles.drop_colour(k, patch)).std(axis=(0, 1))))
                     for k in jax.random.split(jax.random.key(4), 24)}
    assert kept_channels == {0, 1, 2}


def test_step_same_on_1_and_8_devices():
    images = np.random.default_rng(2).integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)
    config = _config(**{"context.colour": "drop"})
    step_on_1_and_8_devices(config, images, stat_keys=("encoder", "head"))


@pytest.mark.parametrize("key,value,match", [
    ("context.crop_size", 17, r"config\.context\.crop_size: is 17: the 3x3 grid of 4-px patches, "
                              r"2 px apart with \+-1 px of jitter, does not fit; it needs .* 18"),
    ("context.jitter", 2, r"config\.context\.jitter: 2 px each way"),
    ("context.colour", "grey", r"config\.context\.colour: is 'grey'"),
    ("context.patch_size", 0, r"config\.context\.patch_size"),
])
def test_bad_config_named_before_compile(key, value, match):
    with pytest.raises(ConfigError, match=match):
        methods.create(_config(**{key: value}), parallel.make_mesh())


def test_vit_whose_patches_do_not_tile_the_patches_is_refused():
    config = _config("data=digits,runlocal,model=vit_ti4", **{"context.patch_size": 6,
                                                               "context.crop_size": 24})
    with pytest.raises(ConfigError, match=r"config\.context\.patch_size: .* 6 px"):
        methods.create(config, None)


def test_train_command_refuses_a_grid_that_does_not_fit(tmp_path):
    assert_train_refuses(tmp_path, f"configs/context.py:{RUNLOCAL}",
                         "--config.context.crop_size=17",
                         "config.context.crop_size: is 17: the 3x3 grid")

"""Rotation (RotNet): every label names the rotation its pixels went through, the loss is the
cross-entropy of a NumPy transcription (a ViT encoder), the global batch's step (1 device vs 8
forced CPU devices, a ResNet), bad input is named before compiling, and docs/new_method.md shows
these files as they are."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import rotation as rotation_config
from ssl_jax import methods, parallel
from ssl_jax.config import ConfigError
from ssl_jax.data import augment
from ssl_jax.methods.pretext import classification_loss
from tests.method_steps import record_calls, set_key, step_on_1_and_8_devices

RUNLOCAL = "data=digits,runlocal"
REPO = Path(__file__).resolve().parent.parent


def _config(arg=RUNLOCAL, **changes):
    config = rotation_config.get_config(arg)
    with config.unlocked():
        for key, value in changes.items():
            set_key(config, key, value)
    return config


def _images(n=8, side=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3)).astype(np.uint8)


@pytest.mark.parametrize("num_rotations", [4, 2])
def test_labels_match_the_rotated_pixels(num_rotations):
    """With the view the whole image (no crop, no flip), copy r of image i is np.rot90 of the image
    by the label's quarter turns, counter-clockwise: a bright pixel in the top-left corner moves to
    the bottom-left at 90 degrees, bottom-right at 180, top-right at 270."""
    config = _config(**{"aug.view1.crop_scale": (1.0, 1.0), "aug.view1.crop_ratio": (1.0, 1.0),
                        "aug.view1.flip": False, "rotation.num_rotations": num_rotations})
    method = methods.create(config, None)
    images = _images(side=16)
    images[:, 0, 0] = 255
    images[:, 0, 1:3] = 0  # the corner's neighbours dark: the corner is findable in every copy
    images[:, 1:3, 0] = 0
    inputs, labels = method.task(jax.random.key(0), jnp.asarray(images))
    inputs, labels = np.asarray(inputs), np.asarray(labels)
    assert inputs.shape == (8, num_rotations, 16, 16, 3) and labels.shape == (8, num_rotations)
    views = np.asarray(augment.normalize(images / 255.0))
    angles = {4: (0, 90, 180, 270), 2: (0, 180)}[num_rotations]
    corner_at = {0: (0, 0), 90: (15, 0), 180: (15, 15), 270: (0, 15)}
    for i in range(8):
        for r in range(num_rotations):
            angle = angles[labels[i, r]]
            np.testing.assert_allclose(inputs[i, r], np.rot90(views[i], angle // 90), atol=1e-5)
            brightest = np.unravel_index(np.argmax(inputs[i, r].sum(-1)), (16, 16))
            assert brightest == corner_at[angle]
    np.testing.assert_array_equal(labels, np.tile(np.arange(num_rotations), (8, 1)))


def test_loss_is_the_cross_entropy_of_the_heads_logits():
    """With a ViT encoder (the 1 vs 8 devices test below has a ResNet's BatchNorm)."""
    method = methods.create(_config("data=digits,runlocal,model=vit_ti4"), None)
    batch = {"image": jnp.asarray(_images())}
    params, extra = method.init(jax.random.key(0), batch)
    head_params = jax.tree_util.tree_map(lambda w: w + 0.3, params["head"])  # not uniform
    params = {**params, "head": head_params}
    calls = record_calls(method, "logits")
    loss, (metrics, _) = method.loss(params, extra, batch, jax.random.key(1), 0)
    logits = np.asarray(calls[0][0], np.float64)
    assert logits.shape == (8 * 4, 4)
    labels = np.tile(np.arange(4), 8)  # image-major: the 4 copies of image 0 first
    log_softmax = logits - np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1,
                                         keepdims=True)) - logits.max(1, keepdims=True)
    np.testing.assert_allclose(loss, -np.mean(log_softmax[np.arange(32), labels]), rtol=1e-5)
    np.testing.assert_allclose(metrics["pretext_acc"],
                               np.mean(np.argmax(logits, 1) == labels), atol=1e-7)
    one = classification_loss(jnp.asarray([[2.0, 0.0]]), jnp.asarray([1]))
    np.testing.assert_allclose(one[0], np.log(1 + np.exp(2.0)), rtol=1e-6)
    assert float(one[1]) == 0.0


def test_step_same_on_1_and_8_devices():
    step_on_1_and_8_devices(_config(), _images(16), stat_keys=("encoder",))


@pytest.mark.parametrize("key,value,match", [
    ("rotation.num_rotations", 3, r"config\.rotation\.num_rotations: is 3"),
    ("rotation.head_layers", 0, r"config\.rotation\.head_layers"),
    ("rotation.head_hidden_dim", 0, r"config\.rotation\.head_hidden_dim"),
])
def test_bad_config_named_before_compile(key, value, match):
    changes = {key: value, **({"rotation.head_layers": 2} if "hidden" in key else {})}
    with pytest.raises(ConfigError, match=match):
        methods.create(_config(**changes), parallel.make_mesh())


def test_the_newcomer_guide_shows_these_files():
    """docs/new_method.md walks through this method: its code blocks are these very files."""
    fence = "`" * 3
    text = (REPO / "docs" / "new_method.md").read_text()
    blocks = re.findall(fence + r"python\n(.*?)" + fence, text, re.S)
    for path in ("ssl_jax/methods/rotation.py", "configs/rotation.py", "tests/test_rotation.py"):
        assert (REPO / path).read_text() in blocks, f"docs/new_method.md: update its copy of {path}"

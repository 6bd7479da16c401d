"""Jigsaw: the permutation set against a NumPy transcription of the paper's Algorithm 1 (its
average and minimum Hamming distances, determinism from the seed), the puzzle's tiles against the
crop (each tile cut from its permuted cell, jittered within it, standardised), the global
batch's step (1 device vs 8), a ViT trained on tiles and evaluated on whole images, and bad
input named before compiling (exit code 2 from the command line)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import jigsaw as jigsaw_config
from ssl_jax import methods, parallel, train
from ssl_jax.config import ConfigError
from ssl_jax.evaluate import __main__ as evaluate_main
from ssl_jax.methods import jigsaw
from tests.method_steps import assert_train_refuses, set_key, step_on_1_and_8_devices

RUNLOCAL = "data=digits,runlocal"


def _config(arg=RUNLOCAL, **changes):
    config = jigsaw_config.get_config(arg)
    with config.unlocked():
        for key, value in changes.items():
            set_key(config, key, value)
    return config


def _pairwise_hamming(perms):
    d = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    return d[~np.eye(len(perms), dtype=bool)]


def algorithm_1_numpy(size, seed):
    """Noroozi & Favaro's Algorithm 1, as written: remove the chosen permutation from P_hat, D =
    Hamming distances between the chosen set and P_hat, the next is argmax of D's column sums."""
    p_hat = np.array(list(itertools.permutations(range(9))))
    j = int(np.random.default_rng(seed).integers(len(p_hat)))  # the seed's first draw
    chosen = []
    for _ in range(size):
        chosen.append(p_hat[j])
        p_hat = np.delete(p_hat, j, axis=0)
        d = np.stack([(p_hat != p).sum(1) for p in chosen])  # [i, 9! - i]
        j = int(np.argmax(d.sum(0)))
    return np.array(chosen)


def test_permutation_set_is_algorithm_1_with_the_papers_hamming_distances():
    np.testing.assert_array_equal(jigsaw.permutation_set(6, 2, 3), algorithm_1_numpy(6, 3))
    p100 = jigsaw.permutation_set(100, 2, 0)
    assert sorted(map(tuple, p100)) == sorted(set(map(tuple, p100)))  # distinct
    assert all(sorted(p) == list(range(9)) for p in p100)  # permutations of 0..8
    d = _pairwise_hamming(p100)
    # The paper's Table 3: the 100-permutation set has average Hamming distance 8.08, minimum 2.
    assert round(d.mean(), 2) == 8.08 and d.min() == 2
    np.testing.assert_array_equal(jigsaw.permutation_set.__wrapped__(100, 2, 0), p100)
    assert not np.array_equal(jigsaw.permutation_set(100, 2, 1), p100)  # another seed


@pytest.mark.parametrize("size,min_hamming", [(85, 4), (35, 7), (9, 9)])
def test_requested_minimum_hamming_distance_holds(size, min_hamming):
    perms = jigsaw.permutation_set(size, min_hamming, 0)
    assert perms.shape == (size, 9) and _pairwise_hamming(perms).min() >= min_hamming


@pytest.mark.parametrize("size,min_hamming,match", [
    (362881, 2, r"config\.jigsaw\.num_permutations: is 362881: must be in \[2, 9! = 362880\]"),
    (100, 9, r"config\.jigsaw\.min_hamming=9: no room for 100 permutations .* found only 9"),
    (10, 10, r"config\.jigsaw\.min_hamming: is 10"),
])
def test_impossible_permutation_sets_are_refused(size, min_hamming, match):
    with pytest.raises(ConfigError, match=match):
        jigsaw.permutation_set(size, min_hamming, 0)


def _standardize(x):
    return (x - x.mean()) / (x.std() + 1e-5)


def test_tiles_are_the_permuted_jittered_cells_standardised():
    """Crop = image (15 px, no resize, no flip): cells of 5 px, 4-px tiles, 1 px of jitter. Tile t
    of the puzzle of label y is the standardised 4x4 patch at one of the 4 jittered places in cell
    P_y[t], and the jitter varies between tiles."""
    config = _config(**{"jigsaw.crop_size": 15, "aug.view1.crop_scale": (1.0, 1.0),
                        "aug.view1.crop_ratio": (1.0, 1.0), "aug.view1.flip": False})
    method = methods.create(config, None)
    images = np.random.default_rng(0).integers(0, 256, (8, 15, 15, 3)).astype(np.uint8)
    tiles, labels = map(np.asarray, method.task(jax.random.key(0), jnp.asarray(images)))
    assert tiles.shape == (8, 9, 4, 4, 3) and labels.shape == (8,)
    assert len(set(labels.tolist())) > 1 and labels.max() < 10
    offsets = set()
    for i in range(8):
        crop = images[i] / 255.0
        for t, cell in enumerate(method.permutations[labels[i]]):
            row, col = divmod(int(cell), 3)
            found = [(dy, dx) for dy in (0, 1) for dx in (0, 1)
                     if np.allclose(tiles[i, t], _standardize(
                         crop[5 * row + dy:5 * row + dy + 4, 5 * col + dx:5 * col + dx + 4]),
                         atol=1e-4)]
            assert len(found) == 1, (i, t)
            offsets.add(found[0])
    assert len(offsets) == 4


def test_step_same_on_1_and_8_devices():
    images = np.random.default_rng(2).integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)
    step_on_1_and_8_devices(_config(), images, stat_keys=("encoder", "head"))


def test_vit_trains_on_tiles_and_evaluates_on_whole_images(tmp_path):
    """A ViT built for the 16-px evaluation input trains on 4-px tiles (its position embeddings
    resampled to the tiles' 1x1 grid) and the evaluation job embeds whole 16-px images."""
    config = _config("data=digits,runlocal,model=vit_ti4", total_steps=2,
                     **{"eval.random_init_baseline": False})
    state = train.train(config, str(tmp_path))
    assert int(state["step"]) == 2 and int(state["nonfinite_steps"]) == 0
    assert state["params"]["encoder"]["pos_embedding"].shape == (1, 1 + 16, 192)
    results = evaluate_main.evaluate(str(tmp_path))
    assert results["ssl"]["linear_top1"] > 0.2  # chance: 0.1


@pytest.mark.parametrize("key,value,match", [
    ("jigsaw.tile_size", 5, r"config\.jigsaw\.tile_size: a 3x3 grid of 5-px tiles does not fit "
                            r"the 12-px crop"),
    ("jigsaw.num_permutations", 400000, r"config\.jigsaw\.num_permutations"),
    ("jigsaw.head_layers", 0, r"config\.jigsaw\.head_layers"),
])
def test_bad_config_named_before_compile(key, value, match):
    with pytest.raises(ConfigError, match=match):
        methods.create(_config(**{key: value}), parallel.make_mesh())


def test_vit_whose_patches_do_not_tile_the_tiles_is_refused():
    config = _config("data=digits,runlocal,model=vit_ti4", **{"jigsaw.crop_size": 18,
                                                               "jigsaw.tile_size": 6})
    with pytest.raises(ConfigError, match=r"config\.jigsaw\.tile_size: .* 6 px, not a multiple "
                                          r"of the ViT's patch size 4"):
        methods.create(config, None)


def test_train_command_refuses_a_set_with_no_room(tmp_path):
    assert_train_refuses(tmp_path, f"configs/jigsaw.py:{RUNLOCAL}",
                         "--config.jigsaw.min_hamming=9", "config.jigsaw.min_hamming=9: no room")

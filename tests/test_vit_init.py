"""ViT initialisation schemes (models/vit_init.py): each kernel's statistics against the formula
of the paper's code, the default unchanged, and an unknown scheme refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.models import create_encoder

DIM, DEPTH, PATCH = 192, 4, 4  # ViT-Ti width: 192 x 768 MLP kernels give ~150k samples each
# The standard deviation of a standard normal cut at +-1: sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)).
TRUNC_1SD = float(np.sqrt(1.0 - 2.0 * np.exp(-0.5) / np.sqrt(2 * np.pi) / 0.682689492))


def _params(scheme, seed=0):
    model = create_encoder("vit_ti4", image_size=16, depth=DEPTH, init_scheme=scheme)
    return model.init(jax.random.key(seed), jnp.zeros((1, 16, 16, 3)), train=False)["params"]


def _check_std(kernel, expected, what):
    std = float(np.std(np.asarray(kernel)))
    # ~150k (MLP) or 37k (proj) samples: the sample std is within ~1% of the true one.
    assert std == pytest.approx(expected, rel=0.03), f"{what}: std {std:.5f} vs {expected:.5f}"
    assert abs(float(np.mean(np.asarray(kernel)))) < 0.05 * expected, what


@pytest.mark.parametrize("scheme", ["mae", "dino", "beit"])
def test_kernel_statistics_follow_the_papers_code(scheme):
    params = _params(scheme)
    patch = np.asarray(params["patch_embed"]["kernel"])  # [p, p, 3, dim]
    fan_in = PATCH * PATCH * 3
    if scheme == "mae":  # xavier-uniform on the flattened kernel: var 2 / (fan_in + fan_out)
        _check_std(patch, np.sqrt(2.0 / (fan_in + DIM)), "patch")
    elif scheme == "beit":  # trunc_normal_(std=0.02, a=-std, b=std)
        _check_std(patch, 0.02 * TRUNC_1SD, "patch")
        assert np.abs(patch).max() <= 0.02
    else:  # torch Conv2d default: uniform(+-1/sqrt(fan_in)), var 1 / (3 fan_in)
        _check_std(patch, np.sqrt(1.0 / (3 * fan_in)), "patch")
        assert np.abs(patch).max() <= 1.0 / np.sqrt(fan_in)
    for layer in range(DEPTH):
        block = params[f"blocks_{layer}"]
        kernels = {"qkv": block["attn"]["qkv"]["kernel"], "proj": block["attn"]["proj"]["kernel"],
                   "fc1": block["mlp"]["fc1"]["kernel"], "fc2": block["mlp"]["fc2"]["kernel"]}
        for name, kernel in kernels.items():
            fan_in, fan_out = kernel.shape
            if scheme == "mae":
                expected = np.sqrt(2.0 / (fan_in + fan_out))
            elif scheme == "dino":
                expected = 0.02
            else:  # BEiT: 0.02 cut at +-1 std, then fix_init_weight (1-based layer id)
                cut = 0.02 / (np.sqrt(2.0 * (layer + 1)) if name in ("proj", "fc2") else 1.0)
                expected = cut * TRUNC_1SD
            _check_std(kernel, expected, f"{scheme} block {layer} {name}")
            if scheme == "mae":  # uniform: bounded by sqrt(3) std
                assert np.abs(kernel).max() <= np.sqrt(3.0) * expected + 1e-7
            elif scheme == "dino":  # a normal, not a +-2 std truncation: the tails reach past 3 std
                assert np.abs(kernel).max() > 3.0 * expected
            else:
                assert np.abs(kernel).max() <= cut + 1e-7
        assert not np.any(block["attn"]["qkv"]["bias"]) and not np.any(block["mlp"]["fc2"]["bias"])


def test_default_is_mae_and_schemes_share_tokens():
    default = create_encoder("vit_ti4", image_size=16, depth=DEPTH)
    assert default.init_scheme == "mae"
    params = default.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)["params"]
    mae = _params("mae")
    jax.tree.map(np.testing.assert_array_equal, params, mae)
    dino = _params("dino")
    # Tokens are trunc-normal(0.02) cut at +-2 std in 'mae' and 'dino'; only kernels differ.
    np.testing.assert_array_equal(dino["cls_token"], mae["cls_token"])
    assert not np.array_equal(dino["blocks_0"]["attn"]["qkv"]["kernel"],
                              mae["blocks_0"]["attn"]["qkv"]["kernel"])
    # BEiT's pre-training cuts its tokens at +-1 std.
    pos = np.asarray(_params("beit")["pos_embedding"])
    assert np.abs(pos).max() <= 0.02 and np.abs(mae["pos_embedding"]).max() > 0.02
    _check_std(pos, 0.02 * TRUNC_1SD, "beit pos_embedding")


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match=r"init_scheme='xavier' is unknown; use one of"):
        _params("xavier")


@pytest.mark.parametrize("scheme,channels", [("mae", 3), ("dino", 1), ("beit", 3)])
def test_patch_bias_is_torch_conv2d_default_for_mae_and_dino_and_zero_for_beit(scheme, channels):
    """MAE's and DINO's ``_init_weights`` leave the patch Conv2d's bias at PyTorch's default,
    uniform(+-1/sqrt(fan_in)) with fan_in = p * p * input channels; BEiT zeroes it."""
    model = create_encoder("vit_ti4", image_size=16, depth=1, init_scheme=scheme)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, channels)), train=False)["params"]
    bias = np.asarray(params["patch_embed"]["bias"])
    if scheme == "beit":
        assert not np.any(bias)
        return
    bound = 1.0 / np.sqrt(PATCH * PATCH * channels)
    assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.8 * bound
    # 192 draws of uniform(+-b): std b / sqrt(3) within ~15%.
    assert float(np.std(bias)) == pytest.approx(bound / np.sqrt(3.0), rel=0.15)

"""ResNet initialisation schemes (`ResNet.init_scheme`, models/resnet.py): the zero-initialised
residual BatchNorm of 'goyal', each scheme's convolution kernels against its formula, and an
unknown scheme refused."""

import numpy as np
import pytest

from ssl_jax.models import ResNet
from tests.test_models import BATCH, images, key  # tiny_resnet: tests/conftest.py


def test_resnet_zero_init_residual(tiny_resnet):
    model, variables = tiny_resnet
    for name, block in variables["params"].items():
        if name.startswith("stage"):
            assert np.all(block["bn2"]["scale"] == 0.0) and np.all(block["bn1"]["scale"] == 1.0)
    assert np.all(variables["params"]["stage2_block1"]["proj_bn"]["scale"] == 1.0)
    x = images(BATCH, 16)
    plain = model.clone(init_scheme="torchvision").init(key(), x, train=False)["params"]
    assert np.all(plain["stage3_block2"]["bn2"]["scale"] == 1.0)

    bottleneck = ResNet(
        stage_sizes=(1,), block="bottleneck", width_multiplier=0.125, cifar_stem=True
    )
    block = bottleneck.init(key(), x, train=False)["params"]["stage1_block1"]
    assert np.all(block["bn3"]["scale"] == 0.0)
    assert np.all(block["bn2"]["scale"] == 1.0) and np.all(block["proj_bn"]["scale"] == 1.0)


def test_resnet_init_schemes_match_their_formulas(tiny_resnet):
    """'goyal' and 'torchvision': He-normal with fan-out, std sqrt(2 / (k*k*c_out)); 'pytorch':
    torch.nn.Conv2d's default U(+-1/sqrt(k*k*c_in)), std 1/sqrt(3*k*k*c_in), every scale at 1."""
    model, _ = tiny_resnet
    x = images(BATCH, 16)
    for scheme in ("goyal", "torchvision", "pytorch"):
        params = model.clone(init_scheme=scheme).init(key(), x, train=False)["params"]
        kernel = np.asarray(params["stage3_block2"]["conv2"]["kernel"])  # [3, 3, c_in, c_out]
        k, _, c_in, c_out = kernel.shape
        if scheme == "pytorch":
            bound = 1.0 / np.sqrt(k * k * c_in)
            assert np.abs(kernel).max() <= bound
            assert kernel.std() == pytest.approx(bound / np.sqrt(3.0), rel=0.1)
        else:
            assert kernel.std() == pytest.approx(np.sqrt(2.0 / (k * k * c_out)), rel=0.15)
        bn2 = params["stage3_block2"]["bn2"]["scale"]
        assert np.all(bn2 == (0.0 if scheme == "goyal" else 1.0)), scheme
    with pytest.raises(ValueError, match=r"init_scheme='he' is unknown; use one of"):
        model.clone(init_scheme="he").init(key(), x, train=False)

"""The method protocol: one ``methods.create`` for every method, the base class's defaults, and
the checks it makes for every method (method sub-config keys, the ViT patch grid)."""

import jax.numpy as jnp
import pytest

from configs import byol as byol_config
from configs import colorization as colorization_config
from configs import dino as dino_config
from configs import ibot as ibot_config
from configs import inpainting as inpainting_config
from configs import mae as mae_config
from configs import moco_v2 as moco_v2_config
from configs import moco_v3 as moco_v3_config
from configs import simclr as simclr_config
from configs import simmim as simmim_config
from ssl_jax import methods
from ssl_jax.config import ConfigError
from ssl_jax.methods.base import MethodBase

METHOD_CONFIGS = [(simclr_config, "data=digits,runlocal"), (dino_config, "data=digits,runlocal"),
                  (mae_config, "data=digits,runlocal"), (byol_config, "data=digits,runlocal"),
                  (moco_v2_config, "data=digits,runlocal"),
                  (moco_v3_config, "data=digits,runlocal"),
                  (simmim_config, "data=digits,runlocal"), (ibot_config, "data=digits,runlocal"),
                  (colorization_config, "data=cifar10,runlocal"),
                  (inpainting_config, "data=digits,runlocal")]


@pytest.mark.parametrize("module,arg", METHOD_CONFIGS)
def test_every_method_is_a_method_base_with_the_same_create(module, arg):
    config = module.get_config(arg)
    method = methods.create(config, None, total_steps=10, steps_per_epoch=5)
    assert isinstance(method, MethodBase)
    assert (method.total_steps, method.steps_per_epoch) == (10, 5)
    images = jnp.ones((2, 8, 8, 3))
    if type(method).encoder_input is MethodBase.encoder_input:
        assert method.encoder_input(images) is images  # the default: the image itself
    else:  # colorization: the L channel
        assert method.encoder_input(images).shape[:3] == images.shape[:3]
    if type(method).after_update is MethodBase.after_update:  # not an EMA teacher (DINO, BYOL,
        # MoCo)
        extra = {"x": jnp.zeros(2)}
        assert method.after_update({}, extra, 0) is extra


@pytest.mark.parametrize("module,arg", METHOD_CONFIGS)
def test_unknown_method_key_is_an_error_naming_it(module, arg):
    config = module.get_config(arg)
    section = config.method
    with config.unlocked():
        config[section]["tempreature"] = 0.3
    with pytest.raises(ConfigError, match=rf"config\.{section}\.tempreature is not a key"):
        methods.create(config, None)


def test_missing_method_key_is_an_error_naming_it():
    config = simclr_config.get_config("data=digits,runlocal")
    with config.unlocked():
        del config.simclr["temperature"]
    with pytest.raises(ConfigError, match=r"config\.simclr\.temperature is missing"):
        methods.create(config, None)


@pytest.mark.parametrize("name", ["ssl_math", "base", "no_such_method"])
def test_a_module_that_is_not_a_method_is_refused(name):
    config = simclr_config.get_config("data=digits,runlocal")
    with config.unlocked():
        config.method = name
    with pytest.raises(ConfigError, match=rf"config.method='{name}' is not a method"):
        methods.create(config, None)


def test_vit_patch_grid_is_checked_for_every_method():
    for module in (simclr_config, dino_config, mae_config, byol_config, moco_v2_config,
                   moco_v3_config):
        config = module.get_config("data=digits,runlocal,model=vit_ti4")
        with config.unlocked():
            config.aug.view1.size = 18
        with pytest.raises(ConfigError, match=r"aug.view1.size=18 .* multiple of the patch "
                                              r"size 4"):
            methods.create(config, None)

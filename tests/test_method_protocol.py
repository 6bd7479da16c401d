"""The method protocol: one ``methods.create`` for every method, the base class's defaults, and
the checks it makes for every method (method sub-config keys, the ViT patch grid)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import byol as byol_config
from configs import colorization as colorization_config
from configs import context as context_config
from configs import dino as dino_config
from configs import ibot as ibot_config
from configs import inpainting as inpainting_config
from configs import jigsaw as jigsaw_config
from configs import mae as mae_config
from configs import moco_v2 as moco_v2_config
from configs import moco_v3 as moco_v3_config
from configs import rotation as rotation_config
from configs import simclr as simclr_config
from configs import simmim as simmim_config
from ssl_jax import methods, parallel
from ssl_jax.config import ConfigError
from ssl_jax.methods.base import MethodBase
from ssl_jax.step import build_state

METHOD_CONFIGS = [(simclr_config, "data=digits,runlocal"), (dino_config, "data=digits,runlocal"),
                  (mae_config, "data=digits,runlocal"), (byol_config, "data=digits,runlocal"),
                  (moco_v2_config, "data=digits,runlocal"),
                  (moco_v3_config, "data=digits,runlocal"),
                  (simmim_config, "data=digits,runlocal"), (ibot_config, "data=digits,runlocal"),
                  (rotation_config, "data=digits,runlocal"),
                  (context_config, "data=digits,runlocal"),
                  (jigsaw_config, "data=digits,runlocal"),
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


@pytest.mark.parametrize("module,arg", METHOD_CONFIGS + [(moco_v3_config,
                                                          "data=digits,model=vit_ti4,runlocal")])
def test_with_encoder_sets_what_encoder_variables_reads(module, arg):
    """``with_encoder(params, extra, v)`` (init_from, imports) keeps the state's layout, and
    ``encoder_variables`` of the result is ``v``, for every method (an EMA teacher or momentum
    encoder set too: MoCo v3's frozen patch projection goes to ``extra['frozen']``)."""
    config = module.get_config(arg)
    mesh = parallel.make_mesh(1)
    method = methods.create(config, mesh)
    abstract = build_state(config, mesh, method, 1, 1).abstract
    params, extra = abstract["params"], abstract["extra"]
    like = method.encoder_variables(params, extra)
    marks = iter(range(1, 10**6))
    variables = jax.tree_util.tree_map(lambda a: np.full(a.shape, next(marks), a.dtype), like)
    new_params, new_extra = method.with_encoder(params, extra, variables)
    for old, new in ((params, new_params), (extra, new_extra)):
        assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(old)
        assert [x.shape for x in jax.tree_util.tree_leaves(new)] == [
            x.shape for x in jax.tree_util.tree_leaves(old)]
    got = method.encoder_variables(new_params, new_extra)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(variables)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(variables),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    if "teacher" in extra:  # the student starts as the teacher
        np.testing.assert_array_equal(
            np.asarray(jax.tree_util.tree_leaves(new_params["encoder"])[0]),
            np.asarray(jax.tree_util.tree_leaves(new_extra["teacher"]["encoder"])[0]))


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

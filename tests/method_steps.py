"""Pieces the method tests share: one loss-and-gradient step of a method on a device mesh, the
comparison of two gradient trees, setting a dotted config key, views without colour (a fraction
of the compile time), recording what a method's networks return inside its loss, and a bad
override refused by the training command before it compiles."""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import cli, methods, parallel, train
from tests import xla_env


def loss_step(method: Any, params: Any, extra: Any, images: np.ndarray, mesh: Any,
              step: int = 0, with_extra: bool = False) -> tuple[Any, ...]:
    """``(loss, grads, metrics)`` on the host of ``method.loss`` for ``images`` sharded over
    ``mesh``'s batch axis (a fixed key, so that meshes can be compared); with ``with_extra`` also
    the updated extra state and the gradient with respect to it."""
    batch = jax.device_put({"image": jnp.asarray(images)}, parallel.batch_sharding(mesh))

    @jax.jit
    def run(params, batch):
        grad_fn = jax.value_and_grad(method.loss, argnums=(0, 1) if with_extra else 0,
                                     has_aux=True, allow_int=with_extra)
        (loss, (metrics, new_extra)), grads = grad_fn(params, extra, batch, jax.random.key(3),
                                                      step)
        if with_extra:
            return loss, grads[0], metrics, new_extra, grads[1]
        return loss, grads, metrics

    return jax.device_get(run(params, batch))


def assert_grads_close(grads: Any, reference: Any) -> None:
    """Leaf by leaf, to float tolerance relative to the largest reference gradient."""
    flat, ref = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(reference)
    scale = max(float(np.max(np.abs(g))) for g in ref)
    for a, b in zip(flat, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def assert_no_gradient(grads: Any) -> None:
    """Every gradient leaf is zero (integer leaves, whose gradient is float0, have none)."""
    for g in jax.tree_util.tree_leaves(grads):
        if g.dtype != jax.dtypes.float0:
            assert float(np.abs(g).max()) == 0.0


def set_key(config: Any, key: str, value: Any) -> None:
    """``config.a.b.c = value`` for ``key = 'a.b.c'`` (the config must be unlocked)."""
    *sections, name = key.split(".")
    target = config
    for part in sections:
        target = target[part]
    target[name] = value


def plain_views(config: Any) -> Any:
    """``config`` (unlocked in place) with crop-and-flip views only: a method's maths at a
    fraction of the compile time of the full augmentations (tested in test_augment.py)."""
    with config.unlocked():
        for view in (config.aug.view1, config.aug.view2):
            view.update(color_jitter=0.0, brightness=None, contrast=None, saturation=None,
                        hue=None, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    return config


def record_calls(obj: Any, name: str) -> list[Any]:
    """Replaces ``obj.<name>`` by a wrapper that appends each call's result to the returned list
    (run the loss un-jitted to read concrete arrays)."""
    calls: list[Any] = []
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]

    setattr(obj, name, wrapper)
    return calls


def step_on_1_and_8_devices(config: Any, images: np.ndarray,
                            stat_keys: tuple[str, ...] = ("state", "target_state")) -> list[Any]:
    """One step of the method of ``config`` on 1 device and on 8 (a momentum target, when the
    method has one, made unlike the online network so that both matter): the loss, gradients and
    the BatchNorm statistics at ``extra[stat_keys]`` agree, and no gradient reaches ``extra``.
    Returns both :func:`loss_step` results (``with_extra``)."""
    results = []
    for num_devices in (1, 8):
        mesh = parallel.make_mesh(devices=jax.devices()[:num_devices])
        method = methods.create(config, mesh)
        params, extra = method.init(jax.random.key(0), {"image": jnp.asarray(images)})
        if "target" in extra:
            extra["target"] = jax.tree_util.tree_map(lambda x: x * 1.1, extra["target"])
        results.append(loss_step(method, params, extra, images, mesh, with_extra=True))
    (loss1, grads1, _, extra1, extra_grads1), (loss8, grads8, _, extra8, extra_grads8) = results
    assert np.isfinite(loss1)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    assert_grads_close(grads8, grads1)
    for key in stat_keys:  # BatchNorm statistics of the global batch on both
        for a, b in zip(jax.tree_util.tree_leaves(extra8[key]),
                        jax.tree_util.tree_leaves(extra1[key]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert_no_gradient((extra_grads1, extra_grads8))
    return results


def run_and_resume(config: Any, root: Path, from_step: int = 1) -> tuple[Any, Any]:
    """``(full, resumed)`` final states on the host: a run of ``config`` in ``root/full``, and a
    copy of its step-``from_step`` checkpoint resumed in ``root/resumed`` (the state of a run
    killed after that checkpoint). ``config`` must checkpoint at ``from_step``."""
    full = train.train(config, str(root / "full"))
    (root / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(root / "full" / "config.json", root / "resumed" / "config.json")
    shutil.copytree(root / "full" / "checkpoints" / str(from_step),
                    root / "resumed" / "checkpoints" / str(from_step))
    resumed = train.train(config, str(root / "resumed"))
    return jax.device_get(full), jax.device_get(resumed)


def assert_train_refuses(tmp_path: Path, config_arg: str, override: str, message: str) -> None:
    """``python -m ssl_jax.train --config CONFIG_ARG OVERRIDE`` exits with code 2 (a user error)
    before compiling or creating the workdir, its last line of stderr containing ``message``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": xla_env.xla_flags(), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "ssl_jax.train", "--config", config_arg,
         "--workdir", str(tmp_path / "run"), override],
        capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert result.returncode == cli.EXIT_USER_ERROR, result.stderr[-2000:]
    assert message in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()

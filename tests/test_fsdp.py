"""FSDP: with ``config.mesh.fsdp > 1`` and ``sharding_rules = (('.*', 'fsdp'),)`` parameters and
optimizer state are really sharded over the ``fsdp`` axis, the train step computes what the
replicated step computes (to float tolerance), and a checkpoint restores into another layout."""

import chex
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import mae as mae_config
from configs import simclr as simclr_config
from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import methods, parallel
from ssl_jax import restore as restore_lib
from ssl_jax.data import pipeline
from ssl_jax.step import build_state, make_train_step

STEPS = 2
FSDP_RULES = ((".*", "fsdp"),)


def _config(module, fsdp: int):
    config = module.get_config("data=digits,runlocal")
    with config.unlocked():
        config.mesh.fsdp = fsdp
        config.sharding_rules = FSDP_RULES if fsdp > 1 else ((".*", "replicate"),)
    return config


def _host_batches(config, n: int) -> list[dict[str, np.ndarray]]:
    loader = pipeline.train_loader(config.data, global_batch_size=config.batch_size, seed=0)
    it = iter(loader)
    return [{k: b[k] for k in ("image", "label")} for b in (next(it) for _ in range(n))]


def _train(config, batches):
    """``(state, losses, mesh)`` after ``len(batches)`` steps of the trainer's jitted step."""
    mesh = parallel.make_mesh(config.mesh.fsdp)
    total = len(batches)
    method = methods.create(config, mesh, total_steps=total, steps_per_epoch=total)
    setup = build_state(config, mesh, method, total, total)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    state = jax.jit(setup.init_state, out_shardings=setup.shardings)(init_rng)
    step_fn = jax.jit(
        make_train_step(method, setup.tx, setup.schedule, step_rng, config.on_nonfinite),
        in_shardings=(setup.shardings, parallel.batch_sharding(mesh)),
        out_shardings=(setup.shardings, parallel.replicated(mesh)), donate_argnums=(0,))
    losses = []
    for batch in batches:
        state, metrics = step_fn(state, parallel.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return state, losses, mesh


def _biggest_leaf(tree) -> tuple[str, jax.Array]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    path, leaf = max(leaves, key=lambda kv: kv[1].size)
    return jax.tree_util.keystr(path), leaf


def _assert_fsdp_sharded(leaf: jax.Array, fsdp: int, what: str) -> None:
    assert isinstance(leaf.sharding, NamedSharding), what
    spec = leaf.sharding.spec
    assert "fsdp" in spec, f"{what}: {spec}"
    dim = list(spec).index("fsdp")
    shard = leaf.addressable_shards[0].data.shape
    assert shard[dim] * fsdp == leaf.shape[dim], f"{what}: shard {shard} of {leaf.shape}"
    assert np.prod(shard) * fsdp == leaf.size


def _without_key_bias(path: str, value: np.ndarray) -> np.ndarray:
    """An attention's fused qkv bias without its key third: softmax ignores a shift shared by a
    row's logits, so the key bias's gradient is 0 and only float noise, which Adam scales up to
    a full step of the learning rate whatever its size, differently in every layout."""
    if "['qkv']['bias']" in path and "['params']" in path:
        dim = value.shape[-1] // 3
        return np.concatenate([value[..., :dim], value[..., 2 * dim:]], axis=-1)
    return value


def _assert_states_close(state, reference) -> None:
    """Leaf by leaf to float tolerance, relative to each leaf's largest reference value."""
    flat = jax.tree_util.tree_leaves_with_path(jax.device_get(state))
    ref = jax.tree_util.tree_leaves(jax.device_get(reference))
    for (key, a), b in zip(flat, ref, strict=True):
        path = jax.tree_util.keystr(key)
        a, b = _without_key_bias(path, np.asarray(a)), _without_key_bias(path, np.asarray(b))
        scale = float(np.max(np.abs(b))) if np.size(b) else 0.0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1.0),
                                   err_msg=path)


@pytest.mark.parametrize("module,fsdp,restore", [(simclr_config, 4, False), (mae_config, 8, True)],
                         ids=["simclr_resnet_fsdp4", "mae_vit_fsdp8_restore"])
def test_fsdp_step_equals_replicated(module, fsdp, restore, tmp_path):
    """And, where ``restore`` (once: an Orbax save costs ~15 s here), a checkpoint of the sharded
    state restores replicated and with another fsdp size."""
    sharded_config, replicated_config = _config(module, fsdp), _config(module, 1)
    batches = _host_batches(sharded_config, STEPS)
    sharded, sharded_losses, mesh = _train(sharded_config, batches)
    replicated, replicated_losses, _ = _train(replicated_config, batches)
    assert mesh.shape == {"data": 8 // fsdp, "fsdp": fsdp}

    # Really sharded: the biggest parameter and its optimizer moments hold 1/fsdp per device.
    name, kernel = _biggest_leaf(sharded["params"])
    _assert_fsdp_sharded(kernel, fsdp, f"params{name}")
    moments = [leaf for leaf in jax.tree_util.tree_leaves(sharded["opt_state"])
               if leaf.shape == kernel.shape]
    assert moments, "no optimizer state shaped like the biggest parameter"
    for leaf in moments:
        _assert_fsdp_sharded(leaf, fsdp, f"opt_state for params{name}")
    assert jax.tree_util.tree_leaves(replicated["params"])[0].sharding.is_fully_replicated

    # Same numbers as the replicated step.
    np.testing.assert_allclose(sharded_losses, replicated_losses, rtol=1e-5)
    assert int(sharded["step"]) == int(replicated["step"]) == STEPS
    _assert_states_close(sharded, replicated)

    if not restore:
        return
    # A checkpoint of the sharded state restores replicated, and sharded another way.
    data_iter = iter(pipeline.train_loader(sharded_config.data,
                                           global_batch_size=sharded_config.batch_size, seed=0))
    saved = ckpt_lib.RunCheckpoints(tmp_path / "fsdp", async_save=False)
    saved.save(STEPS, sharded, data_iter)
    saved.close()
    _, as_replicated, _ = restore_lib.restore_state(tmp_path / "fsdp", replicated_config,
                                                 parallel.make_mesh(1))
    assert jax.tree_util.tree_leaves(as_replicated["params"])[0].sharding.is_fully_replicated
    chex.assert_trees_all_equal(jax.device_get(as_replicated), jax.device_get(sharded))
    _, as_fsdp2, _ = restore_lib.restore_state(tmp_path / "fsdp", _config(module, 2),
                                            parallel.make_mesh(2))
    _assert_fsdp_sharded(_biggest_leaf(as_fsdp2["params"])[1], 2, "restored with fsdp=2")
    chex.assert_trees_all_equal(jax.device_get(as_fsdp2), jax.device_get(sharded))


def test_fsdp_rule_shards_largest_divisible_dim_and_replicates_the_rest():
    mesh = parallel.make_mesh(4)
    tree = {"kernel": jax.ShapeDtypeStruct((6, 32), np.float32),
            "odd": jax.ShapeDtypeStruct((3, 5), np.float32),
            "scale": jax.ShapeDtypeStruct((), np.float32),
            "head": {"w": jax.ShapeDtypeStruct((8, 12), np.float32)}}
    shardings = parallel.tree_shardings(tree, mesh, (("head/.*", "replicate"), (".*", "fsdp")))
    assert shardings["kernel"].spec == P(None, "fsdp")
    assert shardings["odd"].spec == P()
    assert shardings["scale"].spec == P()
    assert shardings["head"]["w"].spec == P()

"""Tests of the encoders (ResNet, ViT), heads and the encoder factory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.models import (
    LinearClassifier,
    ProjectionMLP,
    ResNet,
    ViT,
    create_encoder,
    encoder_dim,
    resnet,
    vit,
)
from ssl_jax.models.vit import DropPath, LayerScale
from ssl_jax.models.vit_position import resize_pos_embed, sincos_2d_pos_embed


def key(seed: int = 0) -> jax.Array:
    """A PRNG key; RBG keys compile far faster than threefry ones on CPU, keeping tests quick."""
    return jax.random.key(seed, impl="rbg")


def num_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def abstract_init(module, image_size: int):
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda: module.init(key(), x, train=False))


def jit_init(module, x, rngs=None):
    """`module.init(rngs, x, train=False)` under jit (one compile beats many eager ops here)."""
    rngs = {"params": key()} if rngs is None else rngs
    return jax.jit(lambda r, x: module.init(r, x, train=False))(rngs, x)


def jit_apply(module, variables, x, **kwargs):
    """`module.apply(variables, x, **kwargs)` under jit; `rngs` is traced, the rest static."""
    rngs = kwargs.pop("rngs", None)
    return jax.jit(lambda v, x, r: module.apply(v, x, rngs=r, **kwargs))(variables, x, rngs)


def images(batch: int, size: int, seed: int = 0) -> jnp.ndarray:
    return jax.random.normal(key(seed), (batch, size, size, 3))


BATCH = 2


# --- ResNet -------------------------------------------------------------------------------------


# torchvision's parameter counts minus the fc layer (num_features * 1000 + 1000).
@pytest.mark.parametrize(
    "depth, expected",
    [(18, 11_176_512), (34, 21_284_672), (50, 23_508_032), (101, 42_500_160), (152, 58_143_808)],
)
def test_resnet_param_count_matches_torchvision(depth, expected):
    model = resnet(depth)
    variables = abstract_init(model, 224)
    assert num_params(variables["params"]) == expected
    assert set(variables) == {"params", "batch_stats"}
    if depth == 50:
        assert expected + model.num_features * 1000 + 1000 == 25_557_032


# The ResNet tests run eagerly on the shapes of the `tiny_resnet` fixture (tests/conftest.py).


def test_resnet18_tiny_output_shape(tiny_resnet):
    model, variables = tiny_resnet
    assert model.num_features == 64
    out = model.apply(variables, images(BATCH, 16, seed=1), train=False)
    assert out.shape == (BATCH, 64) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))

    imagenet_stem = resnet(18, width_multiplier=0.125, cifar_stem=False)
    x = images(BATCH, 16)
    out = jax.eval_shape(
        lambda: imagenet_stem.apply(imagenet_stem.init(key(), x, train=False), x, train=False)
    )
    assert out.shape == (BATCH, 64) and out.dtype == jnp.float32


def test_resnet_stem_and_downsampling_shapes():
    """ImageNet stem reduces 4x, each later stage 2x: 224 -> 7 (and 225 -> 8); CIFAR: 32 -> 4."""
    for cifar_stem, size, final in [(False, 224, 7), (False, 225, 8), (True, 32, 4)]:
        model = resnet(50, width_multiplier=0.0625, cifar_stem=cifar_stem)
        x = jnp.zeros((1, size, size, 3))

        def run(model=model, x=x):
            variables = model.init(key(), x, train=False)
            return model.apply(
                variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
            )

        _, state = jax.eval_shape(run)
        last = state["intermediates"]["stage4_block3"]["__call__"][0]
        assert last.shape == (1, final, final, model.num_features) == (1, final, final, 128)


def test_resnet_num_features_without_init():
    assert resnet(50).num_features == 2048
    assert resnet(18).num_features == 512
    assert resnet(50, width_multiplier=2.0).num_features == 4096
    assert resnet(18, width_multiplier=0.001).num_features == 1
    with pytest.raises(ValueError, match="block"):
        _ = ResNet(stage_sizes=(1,), block="huge").num_features
    with pytest.raises(ValueError, match="depth"):
        resnet(20)


def test_resnet_batchnorm_stats_update_only_in_train(tiny_resnet):
    model, variables = tiny_resnet
    model = model.clone(bn_momentum=0.5)
    x = images(BATCH, 16, seed=2) * 3.0 + 1.0
    stats = variables["batch_stats"]

    out_eval, new = model.apply(variables, x, train=False, mutable=["batch_stats"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, new["batch_stats"], stats)

    _, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
    old_mean = stats["stem_bn"]["mean"]
    new_mean = new["batch_stats"]["stem_bn"]["mean"]
    assert not np.allclose(new_mean, old_mean)
    # momentum 0.5: running = 0.5 * old (zeros) + 0.5 * batch mean of the stem conv output.
    kernel = np.asarray(variables["params"]["stem_conv"]["kernel"])
    padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    stem = sum(padded[:, i : i + 16, j : j + 16] @ kernel[i, j] for i in range(3) for j in range(3))
    np.testing.assert_allclose(new_mean, 0.5 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)

    # In eval mode the output depends on the running statistics, not on the rest of the batch.
    swapped = model.apply(variables, x[::-1], train=False)
    np.testing.assert_allclose(swapped[::-1], out_eval, rtol=1e-5, atol=1e-5)


def test_resnet_bfloat16_compute_keeps_float32_params(tiny_resnet):
    model, variables = tiny_resnet
    model = model.clone(dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(abstract_init(model, 16)))
    out, _ = jax.eval_shape(
        lambda: model.apply(variables, images(BATCH, 16), train=True, mutable=["batch_stats"])
    )
    assert out.dtype == jnp.float32 and out.shape == (BATCH, 64)


# --- ViT ----------------------------------------------------------------------------------------


def vit_param_formula(dim: int, depth: int, patch: int, tokens: int) -> int:
    block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (8 * dim * dim + 5 * dim)
    return patch * patch * 3 * dim + dim + dim + tokens * dim + depth * block + 2 * dim


def test_vit_b16_param_count():
    variables = abstract_init(vit("b", 16), 224)
    n = num_params(variables["params"])
    assert n == 85_798_656 == vit_param_formula(768, 12, 16, 197)
    assert n + 768 * 1000 + 1000 == 86_567_656

    sincos = abstract_init(vit("b", 16, pos_embed="sincos"), 224)["params"]
    assert "pos_embedding" not in sincos
    assert num_params(sincos) == 85_798_656 - 197 * 768


def test_vit_s16_and_l16_param_counts():
    for size, dim, depth in [("s", 384, 12), ("l", 1024, 24)]:
        n = num_params(abstract_init(vit(size, 16), 224)["params"])
        assert n == vit_param_formula(dim, depth, 16, 197)
    assert num_params(abstract_init(vit("s", 16), 224)["params"]) == 21_665_664


@pytest.fixture(scope="module")
def tiny_vit():
    """ViT-Ti/4 with 2 blocks built for 32-px images (an 8x8 patch grid)."""
    model = vit("ti", 4, depth=2, image_size=32)
    variables = jit_init(model, images(BATCH, 32))
    return model, variables


def test_vit_output_shapes(tiny_vit):
    model, variables = tiny_vit
    x = images(BATCH, 32, seed=1)
    out = jit_apply(model, variables, x, train=False)
    tokens = jit_apply(model, variables, x, train=False, return_tokens=True)
    assert out.shape == (BATCH, 192) and out.dtype == jnp.float32
    assert tokens.shape == (BATCH, 1 + 64, 192)
    np.testing.assert_array_equal(out, tokens[:, 0])
    # The final LayerNorm (scale 1, bias 0 at init) normalises every token.
    np.testing.assert_allclose(tokens.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(tokens.std(-1), 1.0, atol=1e-3)


def test_vit_without_cls_token_pools_patch_mean():
    model = vit("ti", 4, depth=1, image_size=16, use_cls_token=False)
    x = images(BATCH, 16)
    variables = jit_init(model, x)
    assert "cls_token" not in variables["params"]
    assert variables["params"]["pos_embedding"].shape == (1, 16, 192)
    out = jit_apply(model, variables, x, train=False)
    tokens = jit_apply(model, variables, x, train=False, return_tokens=True)
    assert tokens.shape == (BATCH, 16, 192)
    np.testing.assert_allclose(out, tokens.mean(axis=1), rtol=1e-5, atol=1e-6)


def test_vit_runs_on_other_resolutions(tiny_vit):
    model, variables = tiny_vit
    assert variables["params"]["pos_embedding"].shape == (1, 1 + 64, 192)
    for size, patches in [(16, 16), (48, 144)]:
        x = images(BATCH, size)
        tokens = jit_apply(model, variables, x, train=False, return_tokens=True)
        assert tokens.shape == (BATCH, 1 + patches, 192)
        assert np.all(np.isfinite(tokens))
        assert jit_apply(model, variables, x, train=False).shape == (BATCH, 192)
    assert jit_apply(model, variables, images(BATCH, 12)[:, :, :8], train=False).shape == (
        BATCH,
        192,
    )


def test_position_embedding_interpolation(tiny_vit):
    model, variables = tiny_vit
    stored = variables["params"]["pos_embedding"]
    cls_pos, patch_pos = model.apply(variables, (4, 4), method=ViT.position_embeddings)
    np.testing.assert_array_equal(cls_pos, stored[:, :1])  # the cls embedding is kept apart
    assert patch_pos.shape == (1, 16, 192)

    # Resampling onto the same grid returns the stored embedding.
    same = resize_pos_embed(stored[:, 1:], (8, 8), (8, 8))
    np.testing.assert_allclose(same, stored[:, 1:], atol=1e-6)
    _, at_original = model.apply(variables, (8, 8), method=ViT.position_embeddings)
    np.testing.assert_array_equal(at_original, stored[:, 1:])

    # Cubic interpolation reproduces a linear ramp exactly away from the border: output pixel j
    # of an 8 -> 12 upsampling sits at input coordinate (j + 0.5) * 8 / 12 - 0.5.
    rows, cols = np.meshgrid(np.arange(8.0), np.arange(8.0), indexing="ij")
    ramp = np.stack([rows, cols, np.ones_like(rows)], axis=-1).reshape(1, 64, 3)
    up = np.asarray(resize_pos_embed(jnp.asarray(ramp, jnp.float32), (8, 8), (12, 12)))
    up = up.reshape(12, 12, 3)
    coord = (np.arange(12) + 0.5) * 8 / 12 - 0.5
    inner = slice(3, 9)
    np.testing.assert_allclose(
        up[inner, inner, 0], np.broadcast_to(coord[inner, None], (6, 6)), atol=1e-5
    )
    np.testing.assert_allclose(
        up[inner, inner, 1], np.broadcast_to(coord[None, inner], (6, 6)), atol=1e-5
    )
    np.testing.assert_allclose(up[..., 2], 1.0, atol=1e-5)  # constants survive everywhere

    # Non-square grids work too.
    assert resize_pos_embed(stored[:, 1:], (8, 8), (3, 5)).shape == (1, 15, 192)


def mae_get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's util/pos_embed.py, verbatim in substance (square grid, no cls row)."""

    def get_1d(embed_dim, pos):
        omega = np.arange(embed_dim // 2, dtype=np.float64)
        omega /= embed_dim / 2.0
        omega = 1.0 / 10000**omega
        pos = pos.reshape(-1)
        out = np.einsum("m,d->md", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = get_1d(embed_dim // 2, grid[0])
    emb_w = get_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def test_sincos_matches_mae_reference():
    for dim, grid in [(192, 8), (64, 5), (768, 14)]:
        ours = sincos_2d_pos_embed(dim, (grid, grid))
        np.testing.assert_allclose(ours, mae_get_2d_sincos_pos_embed(dim, grid), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_pos_embed(6, (2, 2))


def test_vit_sincos_embedding_is_used_and_fixed():
    model = vit("ti", 4, depth=0, image_size=16, pos_embed="sincos")
    x = jnp.zeros((1, 16, 16, 3))
    variables = jit_init(model, x)
    assert "pos_embedding" not in variables["params"]
    # With no blocks, a zero input and the conv bias zeroed (MAE's init draws it uniform), the
    # patch tokens are the position embedding.
    params = dict(variables["params"])
    params["patch_embed"] = {**params["patch_embed"],
                             "bias": jnp.zeros_like(params["patch_embed"]["bias"])}
    tokens = jit_apply(model, {"params": params}, x, train=False, return_tokens=True)
    pos = mae_get_2d_sincos_pos_embed(192, 4)
    mean, var = pos.mean(-1, keepdims=True), pos.var(-1, keepdims=True)
    np.testing.assert_allclose(tokens[0, 1:], (pos - mean) / np.sqrt(var + 1e-6), atol=1e-4)


def test_drop_path_identity_in_eval_and_active_in_train(tiny_vit):
    base, variables = tiny_vit
    dropped = base.clone(drop_path_rate=0.5)
    x = images(BATCH, 32, seed=3)
    reference = jit_apply(base, variables, x, train=False)
    for seed in (1, 2):
        out = jit_apply(dropped, variables, x, train=False, rngs={"dropout": key(seed)})
        np.testing.assert_array_equal(out, reference)
    train_a = jit_apply(dropped, variables, x, train=True, rngs={"dropout": key(1)})
    train_b = jit_apply(dropped, variables, x, train=True, rngs={"dropout": key(2)})
    assert not np.allclose(train_a, train_b)
    # Without drop path, train and eval agree (a ViT has no other train-time randomness).
    np.testing.assert_allclose(jit_apply(base, variables, x, train=True), reference, atol=1e-6)


def test_drop_path_drops_whole_examples_and_rescales():
    x = jnp.ones((2000, 3, 5))
    y = DropPath(0.25).apply({}, x, deterministic=False, rngs={"dropout": key()})
    per_example = np.asarray(y).reshape(2000, -1)
    assert np.all((per_example == 0.0) | np.isclose(per_example, 1 / 0.75))
    assert np.all(per_example.min(1) == per_example.max(1))  # one decision per example
    kept = (per_example[:, 0] > 0).mean()
    assert abs(kept - 0.75) < 0.04


def test_vit_layer_scale():
    model = vit("ti", 4, depth=1, image_size=16, layer_scale_init=1e-4)
    block = abstract_init(model, 16)["params"]["blocks_0"]
    assert block["ls1"]["gamma"].shape == block["ls2"]["gamma"].shape == (192,)
    plain = abstract_init(vit("ti", 4, depth=1, image_size=16), 16)["params"]["blocks_0"]
    assert "ls1" not in plain and "ls2" not in plain

    x = images(BATCH, 3)
    variables = LayerScale(1e-4).init(key(), x)
    np.testing.assert_array_equal(variables["params"]["gamma"], np.full(3, 1e-4, np.float32))
    np.testing.assert_allclose(LayerScale(1e-4).apply(variables, x), 1e-4 * x, rtol=1e-6)


def test_vit_rejects_bad_sizes():
    model = vit("ti", 4, depth=1, image_size=16)
    with pytest.raises(ValueError, match="patch_size=4"):
        model.init(key(), jnp.zeros((1, 18, 16, 3)), train=False)
    with pytest.raises(ValueError, match="patch_size=16"):
        vit("ti", 16, depth=1, image_size=40).init(key(), jnp.zeros((1, 32, 32, 3)), train=False)
    with pytest.raises(ValueError, match="pos_embed"):
        vit("ti", 4, depth=1, image_size=16, pos_embed="rope").init(
            key(), jnp.zeros((1, 16, 16, 3)), train=False
        )
    with pytest.raises(ValueError, match="size"):
        vit("xl", 16)


# --- heads --------------------------------------------------------------------------------------


def test_projection_mlp_structure_and_bn_output():
    head = ProjectionMLP(hidden_dim=32, out_dim=8, num_layers=3)
    x = jax.random.normal(key(), (64, 16)) * 5.0 + 2.0
    variables = head.init(key(1), x, train=False)
    params = variables["params"]
    assert sorted(params) == ["bn0", "bn1", "bn2", "dense0", "dense1", "dense2"]
    assert all("bias" not in params[f"dense{i}"] for i in range(3))
    assert "bias" in params["bn0"] and "bias" in params["bn1"]
    assert sorted(params["bn2"]) == ["scale"]  # SimCLR v2: no centring in the last BN
    out, state = head.apply(variables, x, train=True, mutable=["batch_stats"])
    assert out.shape == (64, 8)
    # Train-mode BN with scale 1: each output feature has batch mean 0 and variance 1.
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(out.var(0), 1.0, atol=1e-2)
    assert not np.allclose(state["batch_stats"]["bn0"]["mean"], 0.0)


def test_projection_mlp_without_bn_matches_numpy():
    head = ProjectionMLP(hidden_dim=12, out_dim=4, num_layers=2, use_bn=False)
    x = jax.random.normal(key(), (5, 6))
    variables = head.init(key(1), x, train=False)
    assert "batch_stats" not in variables
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    hidden = np.maximum(np.asarray(x) @ p["dense0"]["kernel"] + p["dense0"]["bias"], 0.0)
    expected = hidden @ p["dense1"]["kernel"] + p["dense1"]["bias"]
    np.testing.assert_allclose(head.apply(variables, x, train=True), expected, rtol=1e-5, atol=1e-5)

    single = ProjectionMLP(hidden_dim=12, out_dim=4, num_layers=1, use_bn=False)
    assert sorted(single.init(key(1), x, train=False)["params"]) == ["dense0"]
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionMLP(hidden_dim=12, out_dim=4, num_layers=0).init(key(1), x, train=False)


def test_projection_mlp_without_last_bn_is_byols_mlp():
    """BYOL's projector/predictor: Linear -> BN -> ReLU -> Linear (bias, no BN on the output)."""
    head = ProjectionMLP(hidden_dim=12, out_dim=4, num_layers=2, use_bn=True, last_bn=False)
    x = jax.random.normal(key(), (32, 6)) * 3.0
    variables = head.init(key(1), x, train=False)
    assert sorted(variables["params"]) == ["bn0", "dense0", "dense1"]
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    assert "bias" not in p["dense0"] and "bias" in p["dense1"]
    out, _ = head.apply(variables, x, train=True, mutable=["batch_stats"])
    h = np.asarray(x) @ p["dense0"]["kernel"]
    h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p["bn0"]["scale"] + p["bn0"]["bias"]
    expected = np.maximum(h, 0.0) @ p["dense1"]["kernel"] + p["dense1"]["bias"]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_linear_classifier():
    clf = LinearClassifier(num_classes=10)
    x = jax.random.normal(key(), (3, 7))
    variables = clf.init(key(1), x)
    logits = clf.apply(variables, x)
    assert logits.shape == (3, 10)
    np.testing.assert_array_equal(logits, 0.0)


# --- factory ------------------------------------------------------------------------------------


def test_create_encoder_names_and_dims():
    assert isinstance(create_encoder("resnet50", 224), ResNet)
    assert encoder_dim(create_encoder("resnet50", 224)) == 2048
    assert encoder_dim(create_encoder("resnet34", 32, cifar_stem=True)) == 512
    assert encoder_dim(create_encoder("resnet18", 32, width_multiplier=0.5)) == 256
    b16 = create_encoder("vit_b16", 224, pos_embed="sincos")
    assert (b16.dim, b16.depth, b16.num_heads, b16.patch_size) == (768, 12, 12, 16)
    assert b16.pos_embed == "sincos" and encoder_dim(b16) == 768
    h14 = create_encoder("vit_h14", 224)
    assert (h14.dim, h14.depth, h14.patch_size) == (1280, 32, 14)
    ti4 = create_encoder("vit_ti4", 32, dtype="bfloat16")
    assert ti4.image_size == 32 and ti4.dtype == jnp.bfloat16 and encoder_dim(ti4) == 192
    with pytest.raises(TypeError):
        encoder_dim(LinearClassifier(3))


def test_create_encoder_rejects_bad_names_and_options():
    for bad in ("resnet20", "vit_b", "vit_xl16", "convnext", "vit_s16x"):
        with pytest.raises(ValueError, match="valid names: resnet18.*vit_ti"):
            create_encoder(bad, 224)
    with pytest.raises(ValueError, match="widht_multiplier.*valid options.*width_multiplier"):
        create_encoder("resnet18", 32, widht_multiplier=2)
    with pytest.raises(ValueError, match="valid options.*drop_path_rate"):
        create_encoder("vit_s16", 224, cifar_stem=True)
    with pytest.raises(ValueError, match="patch_size"):
        create_encoder("vit_s16", 224, patch_size=8)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("resnet18", {"width_multiplier": 0.125, "cifar_stem": True}),
        ("vit_ti4", {"depth": 2, "drop_path_rate": 0.1}),
    ],
)
def test_encoders_share_one_call_signature(name, kwargs):
    size = 16 if name.startswith("resnet") else 32  # the shapes of the fixtures above
    model = create_encoder(name, size, **kwargs)
    x = images(BATCH, size)
    rngs = {"dropout": key(3)}
    variables = model.init({"params": key(), **rngs}, x, train=False)
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    out, new_state = model.apply(
        {"params": params, **state}, x, train=True, rngs=rngs, mutable=list(state)
    )
    assert out.shape == (BATCH, encoder_dim(model))
    assert set(new_state) == set(state)
    out = model.apply(variables, x, train=False, rngs=rngs)
    assert out.shape == (BATCH, encoder_dim(model))

"""Weights in and out (ssl_jax.convert): parity with timm on a committed fixture (no torch
needed), exact round trips, official checkpoint layouts, the run directory an import writes,
init_from, and bad input. The tests that run timm itself are in tests/test_convert_torch.py
(skipped where torch and timm are not installed)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dino as dino_config
from configs import mae as mae_config
from configs import simclr as simclr_config
from ssl_jax import cli, methods, parallel, restore, train
from ssl_jax.checkpoint import WorkdirError
from ssl_jax.config import ConfigError
from ssl_jax.convert import fit, formats, init_from, keymap, run_dir, timm_export
from ssl_jax.convert.files import WeightsError, read_safetensors, read_weights
from ssl_jax.models import create_encoder
from ssl_jax.models.vit_position import relative_position_index
from ssl_jax.step import build_state
from tests import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "timm_parity")
with open(os.path.join(FIXTURE, "specs.json")) as _f:
    SPECS = json.load(_f)["models"]
EXPECTED = dict(np.load(os.path.join(FIXTURE, "expected.npz")))
TOLERANCE = 1e-5  # float32 features, timm's against the project's


def _weights(name: str) -> str:
    return os.path.join(FIXTURE, f"{name}.safetensors")


def _encoder(model: dict, size: int):
    model = dict(model)
    return create_encoder(model.pop("name"), size, **model)


def _init(encoder, size: int, seed: int = 0):
    """Random variables of the encoder's layout, numpy (every leaf drawn in [0.5, 1.5),
    BatchNorm statistics too, so that no two leaves are alike; nothing is compiled)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: (0.5 + rng.random(a.shape)).astype(a.dtype),
                                  fit.abstract_variables(encoder, size))


def _features(encoder, variables, x, **kw):
    return np.asarray(jax.jit(lambda v, x: encoder.apply(v, x, train=False, **kw))(variables, x))


def _assert_trees_equal(got, want, skip=()):
    got_leaves = dict(jax.tree_util.tree_leaves_with_path(got))
    want_leaves = dict(jax.tree_util.tree_leaves_with_path(want))
    assert got_leaves.keys() == want_leaves.keys()
    for path, value in want_leaves.items():
        if any(s in jax.tree_util.keystr(path) for s in skip):
            continue
        np.testing.assert_array_equal(np.asarray(got_leaves[path]), np.asarray(value),
                                      err_msg=jax.tree_util.keystr(path))


# --- Parity with timm (the committed fixture) ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPECS))
def test_timm_file_gives_timm_features_and_exports_back_to_it(name):
    """timm -> JAX: the project's encoder built from the file's architecture gives timm's
    features (and tokens) to 1e-5; JAX -> timm: the export of those variables is timm's file,
    key for key and bit for bit, with the model name, kwargs and patch lines timm built it from
    (so timm's model from the export is the one whose outputs the fixture holds)."""
    spec, path = SPECS[name], _weights(name)
    tensors, _ = read_safetensors(path)
    parts = formats.parts_of(read_weights(path), path)
    model = spec["project_model"]
    inferred = fit.infer_model(parts.encoder, num_heads=model.get("num_heads", 0))
    assert {k: model[k] for k in inferred if k in model} == {
        k: v for k, v in inferred.items() if k in model}
    encoder = _encoder(model, spec["image_size"])
    variables, _ = fit.load_encoder(parts.encoder, _init(encoder, spec["image_size"]), encoder,
                                    "the model", "")
    x = jnp.asarray(EXPECTED[f"{name}/input"].transpose(0, 2, 3, 1))
    features = _features(encoder, variables, x)
    np.testing.assert_allclose(features, EXPECTED[f"{name}/features"], rtol=0, atol=TOLERANCE)
    if f"{name}/tokens" in EXPECTED:
        tokens = _features(encoder, variables, x, return_tokens=True)
        np.testing.assert_allclose(tokens, EXPECTED[f"{name}/tokens"], rtol=0, atol=TOLERANCE)

    exported = timm_export.timm_tensors(encoder, variables)
    assert sorted(exported) == sorted(tensors)
    for key, value in tensors.items():
        assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    assert timm_export.timm_spec(encoder) == {k: spec[k] for k in ("model_name", "kwargs",
                                                                     "patch")}


ROUND_TRIP_MODELS = {
    "vit_sincos_mask_ls": (dict(name="vit_ti4", depth=2, pos_embed="sincos",
                                use_mask_token=True, layer_scale_init=0.1), 16),
    "vit_no_cls_mean": (dict(name="vit_ti4", depth=1, use_cls_token=False, pool_type="mean"), 16),
    "beit": (dict(name="vit_s8", dim=32, depth=2, num_heads=2, pos_embed="none",
                  rel_pos_bias=True, layer_scale_init=0.1, use_mask_token=True), 16),
    "resnet50_cifar": (dict(name="resnet50", width_multiplier=0.0625, cifar_stem=True), 16),
    "resnet18": (dict(name="resnet18", width_multiplier=0.0625), 16),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_MODELS))
def test_jax_timm_jax_round_trip_is_exact(name):
    """Every leaf (random, BatchNorm statistics included) comes back bit for bit, but what
    timm's model has no place for: the mask token (kept as initialised) and BEiT's key bias
    (zero in timm's Beit; the features are unchanged: it adds one logit to all keys)."""
    model, size = ROUND_TRIP_MODELS[name]
    encoder = _encoder(model, size)
    original = _init(encoder, size, seed=1)
    other = _init(encoder, size, seed=2)
    tensors = timm_export.timm_tensors(encoder, original)
    back, _ = fit.load_encoder(formats.parts_of(tensors, "export").encoder, other, encoder, "m", "")
    _assert_trees_equal(back, original, skip=("mask_token", "qkv']['bias"))
    np.testing.assert_array_equal(back["params"].get("mask_token", 0),
                                  other["params"].get("mask_token", 0))
    for block in (k for k in original["params"] if k.startswith("blocks_")):
        bias, want = back["params"][block]["attn"]["qkv"]["bias"], \
            original["params"][block]["attn"]["qkv"]["bias"].copy()
        if model.get("rel_pos_bias"):
            want[len(want) // 3: 2 * len(want) // 3] = 0.0
        np.testing.assert_array_equal(bias, want)
    if model.get("rel_pos_bias"):
        x = jax.random.normal(jax.random.key(3), (2, size, size, 3))
        np.testing.assert_allclose(_features(encoder, back, x), _features(encoder, original, x),
                                   rtol=0, atol=1e-5)


# --- Official checkpoints: DINO's and MAE's layouts, heads included ------------------------------


def _randomised(tree, seed):
    """Random numpy leaves of ``tree``'s layout (floating leaves in [0.5, 1.5))."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: (0.5 + rng.random(a.shape)).astype(a.dtype)
        if jnp.issubdtype(a.dtype, jnp.floating) else np.zeros(a.shape, a.dtype), tree)


def _state(config):
    """``(method, abstract state, a random state on the devices, mesh)`` of ``config`` (one
    device; nothing compiled)."""
    mesh = parallel.make_mesh(1)
    method = methods.create(config, mesh)
    abstract = build_state(config, mesh, method, 1, 1).abstract
    state = jax.tree_util.tree_map(lambda x, a: jax.device_put(x, a.sharding),
                                   _randomised(abstract, seed=0), abstract)
    return method, abstract, state, mesh


def _timm(prefix, encoder, variables):
    return {prefix + k: v for k, v in timm_export.timm_tensors(encoder, variables).items()}


def test_dino_training_checkpoint_gives_student_teacher_heads_and_centre():
    """DINO's checkpoint layout ({'student': {'module.backbone.*', 'module.head.*'}, 'teacher':
    {'backbone.*', 'head.*'}, 'dino_loss': {'center'}, 'args', ...}) written from a random DINO
    state comes back into a fresh DINO state exactly: the student (params), the teacher
    (extra.teacher) and the centre."""
    config = dino_config.get_config("data=digits,model=vit_ti4,runlocal")
    method, abstract, state, mesh = _state(config)
    want = _randomised({"params": state["params"], "extra": state["extra"]}, seed=4)
    renames = keymap.dino_head_renames(config.dino.head_layers, config.dino.head_bn)
    enc = method.encoder

    def network(prefix, params):
        return {**_timm(f"{prefix}backbone.", enc, {"params": params["encoder"]}),
                **keymap.to_torch({"params": params["head"]}, renames, f"{prefix}head.")}

    checkpoint = {"student": network("module.", want["params"]),
                  "teacher": network("", want["extra"]["teacher"]),
                  "dino_loss": {"center": want["extra"]["center"][None]}, "epoch": 3,
                  "args": "(a Namespace in the real file)"}
    source = init_from.prepare("dino_checkpoint.pth", method, abstract, mesh, content=checkpoint)
    got = source.apply(state, method, mesh)
    _assert_trees_equal(got["params"], want["params"])
    for key in ("teacher", "center"):
        _assert_trees_equal(got["extra"][key], want["extra"][key])
    assert any("student backbone" in n for n in source.notes)


def test_mae_checkpoint_gives_encoder_and_decoder():
    """MAE's layout ({'model': {encoder, 'decoder_*', 'mask_token', 'pos_embed' (sin-cos)}}):
    the encoder and the decoder come back exactly; the stored sin-cos table is checked and
    dropped (the config's ViT computes it)."""
    config = mae_config.get_config("data=digits,runlocal")
    method, abstract, state, mesh = _state(config)
    want = _randomised(state["params"], seed=5)
    model = {**_timm("", method.encoder, {"params": want["encoder"]}),
             **keymap.to_torch({"params": want["decoder"]}, keymap.MAE_DECODER_RENAMES)}
    assert {"pos_embed", "mask_token", "decoder_embed.weight", "decoder_pred.bias"} <= set(model)
    source = init_from.prepare("mae.pth", method, abstract, mesh,
                               content={"model": model, "epoch": 799})
    got = source.apply(state, method, mesh)
    _assert_trees_equal(got["params"], want)
    assert any("sin-cos" in n and "0.00e+00" in n for n in source.notes), source.notes


def test_beit_names_and_split_qkv_are_read_as_timm_vit():
    """BEiT's own names (gamma_1/2, q_bias/v_bias, relative_position_index buffers, per-block
    tables that are all equal) and a ViT with separate q, k, v layers read as timm's ViT."""
    encoder = _encoder(dict(name="vit_s8", dim=32, depth=2, num_heads=2, pos_embed="none",
                            rel_pos_bias=True, layer_scale_init=0.1), 16)
    original = _init(encoder, 16, seed=6)
    for block in ("blocks_0", "blocks_1"):  # BEiT has no key bias
        original["params"][block]["attn"]["qkv"]["bias"][32:64] = 0.0
    timm = timm_export.timm_tensors(encoder, original)  # timm's Beit names
    official = {}
    for name, value in timm.items():
        if name == "rel_pos_bias.relative_position_bias_table":
            for i in range(2):
                official[f"blocks.{i}.attn.relative_position_bias_table"] = value
                official[f"blocks.{i}.attn.relative_position_index"] = np.asarray(
                    relative_position_index((2, 2), 1), np.int64)
        else:
            official[name] = value
    split = {}
    for name, value in timm_export.timm_tensors(
            _encoder(dict(name="vit_ti4", depth=1), 16), _init(
                _encoder(dict(name="vit_ti4", depth=1), 16), 16, seed=7)).items():
        if ".qkv." in name:
            for part, chunk in zip("qkv", np.split(value, 3), strict=True):
                split[name.replace(".qkv.", f".{part}.")] = chunk
        else:
            split[name] = value
    back, _ = fit.load_encoder(formats.parts_of({"model": official}, "beit").encoder,
                               _init(encoder, 16, seed=8), encoder, "m", "")
    _assert_trees_equal(back, original)
    vit = _encoder(dict(name="vit_ti4", depth=1), 16)
    back, _ = fit.load_encoder(formats.parts_of(split, "split").encoder, _init(vit, 16, seed=9),
                               vit, "m", "")
    _assert_trees_equal(back, _init(vit, 16, seed=7))
    official["blocks.1.attn.relative_position_bias_table"] = official[
        "blocks.1.attn.relative_position_bias_table"] + 1.0
    with pytest.raises(WeightsError, match="relative position bias tables of their own"):
        formats.parts_of(official, "beit")


# --- The run directory of an import, evaluation's view of it, export, init_from ----------------


def _digits_config(module=simclr_config, size=32, **changes):
    """A digits runlocal config whose views are ``size`` px (the fixture ViT's input)."""
    config = module.get_config("data=digits,runlocal")
    with config.unlocked():
        config.data.image_size = size
        for view in (config.aug.view1, config.aug.view2):
            view.size = size
        config.update_from_flattened_dict(changes)
    return config


def test_import_writes_a_run_that_evaluates_exports_and_starts_pre_training(tmp_path):
    """The fixture's timm ViT imported as a SimCLR run: the encoder the jobs restore from it
    gives timm's features; its export is timm's file again; pre-training with
    init_from=RUN starts from those weights (a step with every parameter frozen keeps them);
    training in
    the imported directory itself is refused."""
    name, weights = "vit_s16_like", _weights("vit_s16_like")
    config = _digits_config(**{"optim.freeze": ((".*", 100.0),), "total_steps": 1})
    model = run_dir.fit_model_to_file(config, weights, num_heads=3)
    assert (model["dim"], model["depth"], model["num_heads"]) == (48, 2, 3)
    imported = str(tmp_path / "imported")
    record = run_dir.import_weights(weights, config, imported)
    assert record["sha256"] == run_dir.sha256(weights) and record["step"] == 0
    assert sorted(os.listdir(imported)) == ["checkpoints", "config.json", "imported.json"]

    mesh = parallel.make_mesh(1)
    run, method, state, step = restore.restore_run(imported, mesh)
    assert step == 0 and run.model.to_dict() == config.model.to_dict()
    variables = method.encoder_variables(state["params"], state["extra"])
    x = jnp.asarray(EXPECTED[f"{name}/input"].transpose(0, 2, 3, 1))
    np.testing.assert_allclose(_features(method.encoder, variables, x),
                               EXPECTED[f"{name}/features"], rtol=0, atol=TOLERANCE)

    output = str(tmp_path / "encoder.safetensors")
    spec = run_dir.export_timm(imported, output)
    exported, metadata = read_safetensors(output)
    original, _ = read_safetensors(weights)
    assert sorted(exported) == sorted(original)
    assert all(np.array_equal(exported[k], original[k]) for k in original)
    assert json.loads(metadata["timm_spec"])["kwargs"] == SPECS[name]["kwargs"] == spec["kwargs"]
    with pytest.raises(WeightsError, match="exists: choose another --output, or pass "
                                           "--overwrite"):
        run_dir.export_timm(imported, output)

    with pytest.raises(WorkdirError, match="holds imported weights"):
        train.train(config, imported)
    other = _digits_config(**{"init_from": imported})  # --model_from_init: the run's model
    assert other.model.name == "resnet18"
    assert run_dir.model_from_init(other) == config.model.to_dict() == other.model.to_dict()
    with config.unlocked():
        config.init_from = imported
    workdir = str(tmp_path / "continued")
    trained = train.train(config, workdir)
    _assert_trees_equal(trained["params"]["encoder"], state["params"]["encoder"])
    _assert_trees_equal(trained["params"]["head"], state["params"]["head"])  # same method


# --- Bad input: a clear error, exit code 2, nothing written ------------------------------------


class _RunsCode:
    """Unpickling this calls ``os.system`` (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unreadable_and_refused_files(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(WeightsError, match="not found: pass the path of a local"):
        read_weights(missing)
    with open(_weights("vit_s16_like"), "rb") as f:
        data = f.read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="is not a readable safetensors file .*truncated"):
        read_weights(str(truncated))
    text = tmp_path / "notes.pth"
    text.write_text("not weights at all\n")
    with pytest.raises(WeightsError, match="is not a weights file this reader knows"):
        read_weights(str(text))

    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"model": {"w": np.zeros(2)}, "x": _RunsCode(marker)},
                                  protocol=2))
    for allow in (False, True):  # refused, with or without --allow_pickle_classes
        with pytest.raises(WeightsError, match=r"is refused: its pickle names .*posix\.system"):
            read_weights(str(evil), allow_classes=allow)
    evil4 = tmp_path / "evil4.pth"
    evil4.write_bytes(pickle.dumps([_RunsCode(marker)] * 2, protocol=4))  # STACK_GLOBAL, memo
    with pytest.raises(WeightsError, match=r"posix\.system"):
        read_weights(str(evil4), allow_classes=True)
    assert not marker.exists()

    import argparse

    with_args = tmp_path / "checkpoint.pth"
    with_args.write_bytes(pickle.dumps({"args": argparse.Namespace(lr=1.0)}, protocol=2))
    with pytest.raises(WeightsError, match=r"holds argparse\.Namespace beside its tensors.*pass "
                                           r"--allow_pickle_classes"):
        read_weights(str(with_args))


def test_a_file_of_another_architecture_names_the_first_mismatch(tmp_path):
    resnet = _encoder(dict(name="resnet18", width_multiplier=0.0625), 32)
    parts = formats.parts_of(read_weights(_weights("resnet18_w8")), "resnet18_w8")
    with pytest.raises(WeightsError, match=r"do not fit the model: conv1\.weight: shape "
                                           r"\[8, 3, 7, 7\] in the file, \[4, 3, 7, 7\] in the "
                                           r"config's model \(and \d+ more\)\. The file holds "
                                           r"model \{'name': 'resnet18', "
                                           r"'width_multiplier': 0\.125, 'cifar_stem': False\}$"):
        fit.load_encoder(parts.encoder, _init(resnet, 32), resnet, "the model", "")
    vit = _encoder(dict(name="vit_ti16", depth=2), 32)
    with pytest.raises(WeightsError, match=r"patch_embed\.proj\.weight: the config's model has "
                                           r"it with shape \[192, 3, 16, 16\], the file lacks it "
                                           r"\(and \d+ more\)\. The file holds model \{'name': "
                                           r"'resnet18'"):
        fit.load_encoder(parts.encoder, _init(vit, 32), vit, "the model", "")

    # From the trainer: init_from of a mismatching file stops before the workdir is written.
    config = _digits_config(size=16, **{"init_from": _weights("resnet18_w8")})
    with pytest.raises(WeightsError, match=r"conv1\.weight: shape \[8, 3, 7, 7\] in the file, "
                                           r"\[8, 3, 3, 3\] in the config's model"):
        train.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with config.unlocked():
        config.init_from = str(tmp_path / "run")
    with pytest.raises(ConfigError, match="is the run's own --workdir"):
        train.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_model_from_file_needs_heads_of_a_non_standard_vit_and_import_keeps_workdirs(tmp_path):
    parts = formats.parts_of(read_weights(_weights("vit_s16_like")), "vit")
    with pytest.raises(WeightsError, match="has width 48, none of the standard widths .*pass "
                                           "--num_heads"):
        fit.infer_model(parts.encoder)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="exists and is not empty: choose a new directory, or "
                                           "pass --overwrite"):
        run_dir.import_weights(_weights("vit_s16_like"), _digits_config(), str(tmp_path / "run"))
    assert os.listdir(tmp_path / "run") == ["config.json"]


def _cli(*args):
    env = {**os.environ, "XLA_FLAGS": xla_env.xla_flags(), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "ssl_jax.convert", *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["import", "--weights", "{t}/nope.pth", "--config", "configs/simclr.py:data=digits",
      "--workdir", "{t}/run"], "error: weights file {t}/nope.pth not found"),
    (["import", "--weights", _weights("resnet18_w8"), "--config",
      "configs/simclr.py:data=digits,runlocal", "--workdir", "{t}/run"],
     "error: the weights do not fit the config's model 'resnet18' (cifar_stem=True, "
     "width_multiplier=0.125): conv1.weight: shape [8, 3, 7, 7] in the file, [8, 3, 3, 3] in "
     "the config's model"),
    (["export", "--workdir", "{t}/exists", "--output", "{t}/exists/encoder.safetensors"],
     "error: {t}/exists/encoder.safetensors exists: choose another --output, or pass "
     "--overwrite"),
], ids=["missing_file", "other_architecture", "output_exists"])
def test_command_line_errors_exit_2_and_write_nothing(tmp_path, args, message):
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "encoder.safetensors").write_bytes(b"keep")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = _cli(*(a.format(t=tmp_path) for a in args))
    assert result.returncode == cli.EXIT_USER_ERROR, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message.format(t=tmp_path)), \
        result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "exists" / "encoder.safetensors").read_bytes() == b"keep"

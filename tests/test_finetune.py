"""The fine-tuning job: layer-wise decay, mixup/cutmix, label fractions, the job end to end on
a tiny checkpoint (pre-trained and from scratch), bad input that leaves results untouched, resume
after a kill and a non-editable install (the loop it shares with pre-training: test_loop.py)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import finetune as configs_finetune
from configs import simclr as simclr_config
from ssl_jax import optim
from ssl_jax.checkpoint import WorkdirError, check_workdir
from ssl_jax.config import ConfigError
from ssl_jax.data.sources import make_source
from ssl_jax.finetuning import classifier as classifier_lib
from ssl_jax.finetuning import data as finetune_data
from ssl_jax.finetuning import default_config as finetune_config
from ssl_jax.finetuning import job as finetune_job
from ssl_jax.finetuning import mixup
from ssl_jax.models import create_encoder
from ssl_jax.presets import data_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNLOCAL = "configs/finetune.py:data=digits,runlocal"


def _scales_by_path(encoder, decay):
    model = classifier_lib.Classifier(encoder, num_classes=10)
    params = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False))["params"]
    layer_id, num_layers = classifier_lib.layer_ids(encoder)
    scales = optim.layer_decay_scales(params, decay, layer_id, num_layers)
    flat = {jax.tree_util.keystr(p, simple=True, separator="/"): s
            for p, s in jax.tree_util.tree_leaves_with_path(scales)}
    return params, scales, flat, (layer_id, num_layers)


def test_layer_decay_vit_scale_per_layer():
    """ViT of depth 3: embeddings layer 0, block i layer i + 1, norms and head layer 4;
    scale = decay ** (4 - layer)."""
    decay = 0.65
    encoder = create_encoder("vit_ti4", image_size=8, depth=3)
    params, scales, flat, (layer_id, num_layers) = _scales_by_path(encoder, decay)
    assert num_layers == 4
    for name, scale in flat.items():
        part = name.split("/")
        if part[0] == "encoder" and part[1].startswith("blocks_"):
            layer = int(part[1].split("_")[1]) + 1
        elif part[0] == "encoder" and part[1] in ("patch_embed", "cls_token", "pos_embedding"):
            layer = 0
        else:
            assert name.split("/")[-2] in ("norm", "fc_norm", "head"), name
            layer = 4
        assert scale == pytest.approx(decay ** (4 - layer)), name
    assert flat["head/kernel"] == 1.0 and flat["fc_norm/scale"] == 1.0
    assert "encoder/norm/scale" not in flat  # 'gap' pooling drops the final norm (MAE, BEiT)
    assert flat["encoder/patch_embed/kernel"] == pytest.approx(decay**4)
    assert flat["encoder/cls_token"] == pytest.approx(decay**4)
    assert flat["encoder/blocks_0/attn/qkv/kernel"] == pytest.approx(decay**3)
    assert flat["encoder/blocks_2/mlp/fc2/bias"] == pytest.approx(decay)
    # The transform scales each update by its factor: SGD at lr 1 on unit gradients.
    tx = optax.chain(optax.sgd(1.0), optim.scale_by_layer_decay(decay, layer_id, num_layers))
    ones = jax.tree_util.tree_map(lambda p: jnp.ones(p.shape), params)
    updates, _ = tx.update(ones, tx.init(ones), ones)
    jax.tree_util.tree_map(
        lambda u, s: np.testing.assert_allclose(np.asarray(u), -s, rtol=1e-6), updates, scales)


def test_layer_decay_resnet_scale_per_stage():
    encoder = create_encoder("resnet18", image_size=8, width_multiplier=0.125, cifar_stem=True)
    _, _, flat, (_, num_layers) = _scales_by_path(encoder, 0.5)
    assert num_layers == 5
    for name, scale in flat.items():
        block = name.split("/")[1] if name.startswith("encoder/") else ""
        if block.startswith("stem_"):
            layer = 0
        elif block.startswith("stage"):
            layer = int(block[len("stage")])
        else:
            assert name.startswith("head/"), name
            layer = 5
        assert scale == 0.5 ** (5 - layer), name
    with pytest.raises(ConfigError, match="optim.layer_decay"):
        optim.layer_decay_scales({"w": jnp.ones(2)}, 1.5, lambda n: 0, 1)


def _numpy_mix(images, labels, lam, cutmix, box, num_classes, smoothing):
    """timm's Mixup ('batch' mode) in NumPy, given the draw."""
    x = np.array(images, np.float64)
    flipped = x[::-1].copy()
    if cutmix:
        top, bottom, left, right = box
        x[:, top:bottom, left:right] = flipped[:, top:bottom, left:right]
    else:
        x = x * lam + flipped * (1 - lam)
    off = smoothing / num_classes
    y1 = np.full((len(labels), num_classes), off)
    y1[np.arange(len(labels)), labels] = 1 - smoothing + off
    return x, y1 * lam + y1[::-1] * (1 - lam)


def test_mixup_and_cutmix_match_numpy():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(6, 10, 12, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, size=6), jnp.int32)
    draws = jax.jit(jax.vmap(lambda k: mixup.sample_mix(
        k, 10, 12, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)))(
            jax.random.split(jax.random.key(0), 400))
    assert 0.4 < float(draws.cutmix.mean()) < 0.6  # about switch_prob of the batches cut
    mix = jax.jit(lambda p: mixup.apply_mix(images, labels, p, 5, 0.1))
    for i in range(30):
        params = jax.tree_util.tree_map(lambda a, i=i: a[i], draws)
        lam, cutmix, box = float(params.lam), bool(params.cutmix), np.asarray(params.box)
        got_x, got_y = mix(params)
        want_x, want_y = _numpy_mix(images, labels, lam, cutmix, box, 5, 0.1)
        np.testing.assert_allclose(np.asarray(got_x), want_x, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(got_y), want_y, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(got_y).sum(1), 1.0, rtol=1e-6)
        assert 0.0 <= lam <= 1.0
        if cutmix:  # lam is the share of the image left unpasted
            top, bottom, left, right = box
            assert 0 <= top <= bottom <= 10 and 0 <= left <= right <= 12
            assert lam == pytest.approx(1 - (bottom - top) * (right - left) / 120)
    assert set(np.asarray(draws.cutmix[:30]).tolist()) == {True, False}


def test_label_smoothing_targets_without_mixing():
    labels = jnp.asarray([0, 3, 1], jnp.int32)
    images = jnp.ones((3, 4, 4, 3))
    x, y = mixup.mix_batch(jax.random.key(0), images, labels, 4, mixup_alpha=0.0,
                           cutmix_alpha=0.0, smoothing=0.2)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(images))
    want = np.full((3, 4), 0.05)
    want[[0, 1, 2], [0, 3, 1]] = 0.85
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-6)


def test_label_fraction_sampling_is_class_balanced_and_seeded():
    data = data_config(name="digits", image_size=8)
    source = make_source(data, "train")
    labels = finetune_data.split_labels(source)
    idx = finetune_data.labelled_indices(data, 0.1, seed=3)
    counts = np.bincount(labels, minlength=10)
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=10),
                                  np.floor(0.1 * counts + 0.5))
    np.testing.assert_array_equal(idx, finetune_data.labelled_indices(data, 0.1, seed=3))
    assert not np.array_equal(idx, finetune_data.labelled_indices(data, 0.1, seed=4))
    assert finetune_data.labelled_indices(data, 1.0, seed=3) is None
    subset = finetune_data.SubsetSource(source, idx)
    assert len(subset) == len(idx) and subset[5]["id"] == source[int(idx[5])]["id"]
    batch = next(iter(finetune_data.labelled_train_loader(data, idx, global_batch_size=16,
                                                          seed=0)))
    assert batch["image"].shape == (16, 8, 8, 3) and batch["label"].shape == (16,)
    for bad in (0.001, 0.0, 1.5):
        with pytest.raises(ConfigError, match="label_fraction"):
            finetune_data.labelled_indices(data, bad, seed=0)


def test_finetune_presets():
    imagenet = finetune_config.get_config("data=imagenet2012")
    assert (imagenet.batch_size, imagenet.num_epochs, imagenet.drop_path_rate) == (1024, 100, 0.1)
    assert (imagenet.optim.base_lr, imagenet.optim.layer_decay) == (5e-4, 0.65)
    assert (imagenet.mixup.mixup_alpha, imagenet.mixup.cutmix_alpha) == (0.8, 1.0)
    large = finetune_config.get_config("data=imagenet2012,vit=l")
    assert (large.optim.layer_decay, large.num_epochs, large.optim.base_lr) == (0.75, 50, 1e-3)
    assert finetune_config.get_config("data=cifar10").batch_size > 0
    # configs/finetune.py re-exports the package's recipe (for --config configs/finetune.py:...).
    assert configs_finetune.get_config is finetune_config.get_config


def _snapshot(workdir):
    """Every file of the pre-training run except finetune.json and the fine-tunings' own folder
    (RUN/finetune/), with its bytes."""
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            path = os.path.relpath(os.path.join(root, f), workdir)
            if f != finetune_job.RESULTS_FILE and not path.startswith(
                    finetune_job.FINETUNE_DIR + os.sep):
                out[path] = open(os.path.join(workdir, path), "rb").read()
    return out


def _is_a_fraction_of(num_test: int, top1: float) -> bool:
    """``top1`` is a share of ``num_test`` test images: ``k / num_test`` for an integer k."""
    k = round(top1 * num_test)
    return 0 <= k <= num_test and abs(top1 - k / num_test) < 1e-6


def test_finetune_job_pretrained_and_from_scratch(trained_run, capsys):
    _, workdir = trained_run
    before = _snapshot(workdir)
    pre = finetune_job.finetune(str(workdir), RUNLOCAL)
    assert pre["init"] == "pretrained" and pre["checkpoint_step"] == 6
    assert pre["num_test"] == 360 and _is_a_fraction_of(360, pre["test_top1"])
    assert pre["num_labelled"] == 1437 and pre["steps"] == 6
    scratch = finetune_job.finetune(str(workdir), RUNLOCAL,
                                    ["from_scratch=True", "label_fraction=0.1"])
    assert scratch["init"] == "from_scratch" and _is_a_fraction_of(360, scratch["test_top1"])
    assert scratch["num_labelled"] == 145  # 10% of each class of the 1,437, rounded
    saved = json.loads((workdir / "finetune.json").read_text())
    assert {"pretrained@step6,label_fraction=1.0",
            "from_scratch,label_fraction=0.1"} <= set(saved)
    assert saved["pretrained@step6,label_fraction=1.0"]["test_top1"] == pre["test_top1"]
    assert "test top-1" in capsys.readouterr().out
    assert _snapshot(workdir) == before  # nothing of the pre-training run changed


def test_bad_input_names_the_key_and_keeps_results(trained_run, tmp_path):
    _, trained = trained_run
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("finetune*"))
    earlier = '{"earlier": "kept"}'
    (workdir / "finetune.json").write_text(earlier)
    with pytest.raises(ConfigError, match=r"model\.width_multiplier.*checkpoints/6"):
        finetune_job.finetune(str(workdir), RUNLOCAL, ["model.width_multiplier=0.25"])
    with pytest.raises(ConfigError, match="label_fraction"):
        finetune_job.finetune(str(workdir), RUNLOCAL, ["label_fraction=0.001"])
    with pytest.raises(ConfigError, match="label_fraction"):
        finetune_job.finetune(str(workdir), RUNLOCAL, ["label_fraction=0.0"])
    with pytest.raises(ConfigError, match="config.pool"):
        finetune_job.finetune(str(workdir), RUNLOCAL, ["pool=cls"])
    with pytest.raises(WorkdirError, match="available steps"):
        finetune_job.finetune(str(workdir), RUNLOCAL, ["step=4"])
    # A config.json that does not describe the checkpoint's encoder.
    run_json = workdir / "config.json"
    saved = json.loads(run_json.read_text())
    saved["model"]["width_multiplier"] = 0.25
    run_json.write_text(json.dumps(saved))
    with pytest.raises(WorkdirError, match=r"checkpoints/6"):
        finetune_job.finetune(str(workdir), RUNLOCAL)
    assert (workdir / "finetune.json").read_text() == earlier
    assert not list(workdir.glob("finetune*tmp*"))


def test_config_comes_from_the_run_and_a_vit_keeps_its_image_size(trained_run, tmp_path):
    _, workdir = trained_run
    config, run = finetune_job.load_config(workdir)  # no --config: the run's dataset's recipe
    assert config.recipe == "digits" and config.batch_size == 128
    assert config.model == run.model and config.data == run.data
    vit_run = simclr_config.get_config("data=digits,runlocal,model=vit_ti4")
    check_workdir(tmp_path, vit_run)  # a ViT run's config.json, no checkpoint needed
    with pytest.raises(ConfigError, match=r"image_size=32.*16x16.*config\.json"):
        finetune_job.finetune(str(tmp_path), RUNLOCAL, ["from_scratch=True", "image_size=32"])
    with pytest.raises(WorkdirError, match="no checkpoint"):
        finetune_job.finetune(str(tmp_path), RUNLOCAL)
    assert sorted(os.listdir(tmp_path)) == ["config.json"]


def test_command_line_reports_a_user_error(trained_run):
    _, workdir = trained_run
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "ssl_jax.finetune", "--workdir", str(workdir), "--config", RUNLOCAL,
         "--config.label_fraction=0.001"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: config.label_fraction" in result.stderr


def test_pool_choices():
    vit = create_encoder("vit_ti4", image_size=8, depth=1, use_cls_token=False)
    with pytest.raises(ValueError, match="cls token"):
        classifier_lib.check_pool(vit, "cls")
    classifier_lib.check_pool(vit, "gap")


# --- Checkpoints, resume, faults (the pre-training loop's guarantees, ssl_jax.loop) -----------
# Fine-tunings here are subprocesses on 1 CPU device sharing a persistent compilation cache, of
# the same 6-step runlocal fine-tuning with a checkpoint every 2 steps.

FT_FLAGS = ("--config", RUNLOCAL, "--config.checkpoint.every_steps=2", "--config.log_every=1")
FT_NAME = "pretrained_step6_label_fraction_1.0"  # RUN/finetune/<this>: the result name, sanitised


@pytest.fixture(scope="module")
def ft_env(tmp_path_factory):
    return dict(
        os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("ft_jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", SSL_JAX_PEAK_FLOPS="1e11")


def _copy_run(trained, target):
    """The pre-training run without any fine-tuning of it."""
    shutil.copytree(trained, target, ignore=shutil.ignore_patterns("finetune*"))
    return target


def _finetune(env, workdir, *flags, fault=""):
    command = ([sys.executable, os.path.join(REPO, "tests", "finetune_fault_driver.py"),
                f"--fault={fault}"] if fault else [sys.executable, "-m", "ssl_jax.finetune"])
    return subprocess.run([*command, "--workdir", str(workdir), *FT_FLAGS, *flags], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def _ft_steps(workdir):
    return sorted(int(n) for n in os.listdir(workdir / "finetune" / FT_NAME / "checkpoints")
                  if n.isdigit())


def _final(workdir):
    """``(state, data position, test top-1)`` of the fine-tuning's step 6."""
    import orbax.checkpoint as ocp

    step_dir = workdir / "finetune" / FT_NAME / "checkpoints" / "6"
    state = ocp.StandardCheckpointer().restore(step_dir / "state")
    entry = json.loads((workdir / "finetune.json").read_text())[
        "pretrained@step6,label_fraction=1.0"]
    return state, (step_dir / "data" / "process_0-of-1.json").read_bytes(), entry["test_top1"]


@pytest.fixture(scope="module")
def ft_reference(trained_run, ft_env, tmp_path_factory):
    """An uninterrupted fine-tuning: its run's workdir."""
    workdir = _copy_run(trained_run[1], tmp_path_factory.mktemp("ft_ref") / "run")
    done = _finetune(ft_env, workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _ft_steps(workdir) == [4, 6]  # keep=2
    return workdir


@pytest.fixture(scope="module")
def ft_preempted(trained_run, ft_env, tmp_path_factory):
    """A fine-tuning sent SIGTERM while its 3rd batch is assembled: what it left."""
    workdir = _copy_run(trained_run[1], tmp_path_factory.mktemp("ft_term") / "run")
    done = _finetune(ft_env, workdir, fault="sigterm:3")
    return workdir, done.returncode, done.stderr, _ft_steps(workdir)


def test_sigterm_saves_the_current_step_and_exits_75(ft_preempted):
    workdir, returncode, stderr, steps = ft_preempted
    assert returncode == 75, stderr[-3000:]
    assert "preempted: saved the checkpoint of step 3" in stderr
    assert steps == [2, 3]  # the periodic checkpoint and the step it stopped at
    assert json.loads((workdir / "finetune" / FT_NAME / "config.json").read_text())["pool"]
    assert not (workdir / "finetune.json").exists()  # no result before the fine-tuning ends
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]  # pre-training's untouched


def test_sigkill_mid_run_then_resume_equals_uninterrupted(ft_preempted, ft_reference, ft_env):
    """The preempted fine-tuning resumes, is SIGKILLed during step 5 (its 2nd batch), resumes
    again and ends bit for bit as the uninterrupted one: parameters, optimizer state, data
    position and test top-1."""
    workdir = ft_preempted[0]
    killed = _finetune(ft_env, workdir, fault="batch:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert f"resumed {workdir}/finetune/{FT_NAME} from step 3" in killed.stderr
    assert _ft_steps(workdir) == [3, 4]
    resumed = _finetune(ft_env, workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {workdir}/finetune/{FT_NAME} from step 4" in resumed.stderr
    state, position, top1 = _final(workdir)
    want_state, want_position, want_top1 = _final(ft_reference)
    chex.assert_trees_all_equal(state, want_state)
    assert position == want_position and top1 == want_top1
    rows = [json.loads(line) for line in
            (workdir / "finetune" / FT_NAME / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == set(range(1, 7))  # every invocation's rows
    curve = json.loads((workdir / "finetune.json").read_text())[
        "pretrained@step6,label_fraction=1.0"]["train_loss_curve"]
    assert [s for s, _ in curve] == list(range(1, 7))


def test_finetune_folder_of_another_model_is_refused(trained_run, tmp_path, capsys):
    from ssl_jax import cli
    from ssl_jax import config as config_lib

    workdir = _copy_run(trained_run[1], tmp_path / "run")
    config, _ = finetune_job.load_config(workdir, RUNLOCAL)
    with config.unlocked():
        config.model.width_multiplier = 0.25
    folder = workdir / "finetune" / FT_NAME
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config_lib.to_json(config))
    with pytest.raises(SystemExit) as exit_info:
        cli.guard(lambda argv: finetune_job.finetune(str(workdir), RUNLOCAL))([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {folder} holds a fine-tuning with model=" in err
    assert "Move that folder away" in err
    assert sorted(os.listdir(folder)) == ["config.json"]  # nothing written
    assert not (workdir / "finetune.json").exists()


def test_runs_from_a_non_editable_install(trained_run, ft_env, ft_reference, tmp_path):
    """An install that is not editable (the package's files as a wheel holds them, built by
    setuptools from pyproject.toml: ``build_py``, what ``pip install .`` puts in site-packages;
    pip's own wheel build needs the ``wheel`` package), run from outside the repository without
    ``--config``: the job finds its recipe in the package, not in the repository's configs/."""
    source, target = tmp_path / "src", tmp_path / "site"
    source.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    shutil.copytree(os.path.join(REPO, "ssl_jax"), source / "ssl_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py",
         "--build-lib", str(target)], capture_output=True, text=True, timeout=300, cwd=source)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (target / "ssl_jax" / "finetuning" / "default_config.py").exists()
    assert sorted(os.listdir(target)) == ["ssl_jax"]  # no configs/, no tests/
    workdir = _copy_run(trained_run[1], tmp_path / "run")
    env = {**ft_env, "PYTHONPATH": str(target)}
    # The digits recipe overridden into the runlocal fine-tuning of FT_FLAGS: the same result.
    same_as_runlocal = ("--config.total_steps=6", "--config.batch_size=32",
                        "--config.optim.warmup_epochs=0", "--config.eval_batch_size=64",
                        "--config.log_every=1", "--config.checkpoint.every_steps=2",
                        "--config.checkpoint.async_save=False")
    done = subprocess.run(
        [sys.executable, "-m", "ssl_jax.finetune", "--workdir", str(workdir), *same_as_runlocal],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    where = subprocess.run(  # the same interpreter, environment and folder import the install
        [sys.executable, "-c", "import ssl_jax.finetune as f, ssl_jax.finetuning.job as j;"
         "print(f.__file__); print(j.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.split() == [f"{target}/ssl_jax/finetune.py",
                                    f"{target}/ssl_jax/finetuning/job.py"], where.stderr
    entry = json.loads((workdir / "finetune.json").read_text())[
        "pretrained@step6,label_fraction=1.0"]
    assert entry["config"]["recipe"] == "digits" and entry["steps"] == 6
    assert entry["directory"] == str(workdir / "finetune" / FT_NAME)
    assert entry["test_top1"] == _final(ft_reference)[2]

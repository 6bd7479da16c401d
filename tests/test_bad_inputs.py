"""Bad input ends a job with a clear error naming the fix, a non-zero exit code, nothing lost
(invariant 4). The table of bad inputs, messages and exit codes is docs/bad_inputs.md; this file
holds the rows that no other test file covers."""

import errno
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from PIL import Image

from configs import dino as dino_config
from configs import simclr as simclr_config
from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import cli, methods, parallel, presets, train
from ssl_jax import restore as restore_lib
from ssl_jax.config import ConfigError
from ssl_jax.data import pipeline, sources
from ssl_jax.data.sources import DataError
from ssl_jax.evaluate import __main__ as evaluate_job
from tests import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNLOCAL = "data=digits,runlocal"


def _config(arg=RUNLOCAL, **changes):
    config = simclr_config.get_config(arg)
    with config.unlocked():
        config.update_from_flattened_dict(changes)
    return config


def _cli(module, *args, timeout=300):
    """``python -m module args`` on one CPU device: the completed process."""
    env = {**os.environ, "XLA_FLAGS": xla_env.xla_flags(), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def _guarded_exit(main, capsys):
    """Runs ``main`` as ``cli.run`` would: ``(exit code, stderr)``."""
    with pytest.raises(SystemExit) as exit_info:
        cli.guard(main)(["prog"])
    return exit_info.value.code, capsys.readouterr().err


# --- Command line and config: exit code 2, one line, nothing written ----------------------------

TRAIN = "ssl_jax.train"
SIMCLR = f"configs/simclr.py:{RUNLOCAL}"


@pytest.mark.parametrize("module, args, message", [
    (TRAIN, ["--workdir", "{w}"], "error: --config and --workdir are required"),
    (TRAIN, ["--config", "configs/nope.py", "--workdir", "{w}"],
     "error: --config: the config file does not load ([Errno 2] No such file"),
    (TRAIN, ["--config", "configs/simclr.py:dta=digits", "--workdir", "{w}"],
     "error: unknown preset 'dta' in config argument"),
    (TRAIN, ["--config", "configs/simclr.py:data=mnist", "--workdir", "{w}"],
     "error: unknown data='mnist'; choose one of digits, cifar10, imagenet2012"),
    (TRAIN, ["--config", SIMCLR, "--workdir", "{w}", "--config.simclr.temprature=0.2"],
     "error: unknown config key in --config.simclr.temprature: the config has no 'temprature'. "
     "Did you mean \"temperature\""),
    (TRAIN, ["--config", SIMCLR, "--workdir", "{w}", "--config.batch_size=many"],
     "error: flag --config.batch_size=many: invalid literal for int()"),
    (TRAIN, ["--config", SIMCLR, "--workdir", "{w}", "--bogus_flag=1"],
     "error: Unknown command line flag 'bogus_flag'"),
    (TRAIN, ["--config", SIMCLR, "--workdir", "{w}", "extra"],
     "error: unexpected arguments: ['extra']"),
    (TRAIN, ["--config", SIMCLR, "--workdir", "{w}", "--config.mesh.fsdp=3"],
     "error: config.mesh.fsdp=3 must divide the device count 1"),
    ("ssl_jax.evaluate", [], "error: --workdir is required"),
    ("ssl_jax.evaluate", ["--workdir", "{w}"], "error: {w}/config.json not found: --workdir must "
     "be the directory of a training run"),
], ids=["no_config", "config_file_missing", "unknown_preset", "bad_preset_value", "unknown_key",
        "wrong_type", "unknown_flag", "positional_argument", "fsdp", "eval_no_workdir",
        "eval_not_a_run"])
def test_command_line_errors_exit_2(tmp_path, module, args, message):
    workdir = tmp_path / "run"
    result = _cli(module, *(a.format(w=workdir) for a in args))
    assert result.returncode == cli.EXIT_USER_ERROR, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(message.format(w=workdir)), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not workdir.exists()  # nothing was written


@pytest.mark.parametrize("changes, error, match", [
    ({"batch_size": -4}, ConfigError, r"config\.batch_size: must be > 0"),
    ({"num_epochs": 0.0, "total_steps": 0}, ConfigError,
     r"config\.num_epochs: set num_epochs or total_steps"),
    ({"on_nonfinite": "ignore"}, ConfigError, r"config\.on_nonfinite: must be 'skip' or 'stop'"),
    ({"mesh.fsdp": 3}, ConfigError, r"config\.mesh\.fsdp=3 must divide the device count 8"),
    ({"batch_size": 12}, ConfigError,
     r"config\.batch_size=12 is not divisible by the device count 8"),
    ({"method": "simclrr"}, ConfigError, r"config\.method='simclrr' is not a method of ssl_jax"),
    ({"data.image_size": 0}, DataError, r"config\.data\.image_size=0 must be an integer >= 1"),
    ({"data.num_workers": -1}, DataError,
     r"config\.data\.num_workers=-1 must be an integer >= 0"),
    ({"data.read_threads": 0}, DataError,
     r"config\.data\.read_threads=0 must be an integer >= 1"),
    ({"model.dtype": "float16"}, ConfigError,
     r"config\.model\.dtype='float16' is not a compute dtype of the encoders: use one of "
     r"\('float32', 'bfloat16'\)"),
], ids=["negative_batch", "no_length", "on_nonfinite", "fsdp", "batch_vs_devices", "method",
        "image_size", "num_workers", "read_threads", "model_dtype"])
def test_trainer_config_errors_name_the_key(tmp_path, changes, error, match):
    with pytest.raises(error, match=match):
        train.train(_config(**changes), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_vit_view_size_must_be_a_multiple_of_the_patch():
    config = _config("data=digits,runlocal,model=vit_ti4", **{"aug.view1.size": 18})
    with pytest.raises(ConfigError, match=r"config\.aug\.view1\.size=18 .* patch size 4 of "
                                          r"model\.name='vit_ti4'"):
        methods.create(config, parallel.make_mesh())


@pytest.mark.parametrize("arg, scheme, choices", [
    ("data=digits,runlocal", "he", "goyal, torchvision, pytorch"),
    ("data=digits,runlocal,model=vit_ti4", "goyal", "mae, dino, beit")])
def test_unknown_init_scheme_names_the_key_and_the_choices(arg, scheme, choices):
    config = _config(arg, **{"model.init_scheme": scheme})
    with pytest.raises(ConfigError, match=rf"config\.model\.init_scheme='{scheme}' is unknown "
                                          rf"for \w+; use one of {choices}"):
        methods.create(config, parallel.make_mesh())


# --- Data ---------------------------------------------------------------------------------------

def _encoded(image, fmt="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_image_folder_of_mixed_sizes_and_channels_is_converted(tmp_path):
    """Policy: any size, grayscale / alpha / palette / CMYK / 16-bit images become RGB
    [S, S, 3] uint8 (shorter side resized, centre crop); alpha is dropped, 16-bit keeps its
    top 8 bits."""
    gray = np.full((20, 30), 200, np.uint8)
    rgb = np.dstack([gray, gray // 2, gray // 4])
    images = {
        "a_gray.png": (Image.fromarray(gray), (200, 200, 200)),
        "b_gray_alpha.png": (Image.fromarray(np.dstack([gray, gray // 3]), "LA"), (200,) * 3),
        "c_rgba.png": (Image.fromarray(np.dstack([rgb, np.zeros_like(gray)])), (200, 100, 50)),
        "d_palette.png": (Image.fromarray(rgb).convert("P"), None),
        "e_cmyk.jpg": (Image.fromarray(rgb).convert("CMYK"), (200, 100, 50)),
        "f_16bit.png": (Image.fromarray(np.full((7, 5), 50000, np.uint16)), (195, 195, 195)),
        "g_tall.png": (Image.fromarray(np.full((300, 3, 3), 90, np.uint8)), (90, 90, 90)),
        "h_one_pixel.png": (Image.fromarray(np.full((1, 1, 3), 60, np.uint8)), (60, 60, 60)),
    }
    (tmp_path / "train" / "c0").mkdir(parents=True)
    for name, (image, _) in images.items():
        (tmp_path / "train" / "c0" / name).write_bytes(
            _encoded(image, "JPEG" if name.endswith(".jpg") else "PNG"))
    cfg = presets.data_config(name="folder", root=str(tmp_path), image_size=8)
    (batch,) = pipeline.eval_batches(cfg, "train", batch_size=8)
    assert batch["image"].shape == (8, 8, 8, 3) and batch["image"].dtype == np.uint8
    assert batch["mask"].all()  # every image read, none skipped
    for row, (_, expected) in enumerate(images.values()):
        if expected is not None:
            np.testing.assert_allclose(batch["image"][row, 4, 4], expected, atol=3)
    train_batch = next(iter(pipeline.train_loader(cfg, global_batch_size=8, seed=0)))
    assert train_batch["image"].shape == (8, 8, 8, 3)


def test_empty_split_and_empty_class_folder(tmp_path):
    root = tmp_path / "data"
    for name in ("cat", "dog"):
        (root / "train" / name).mkdir(parents=True)
    cfg = presets.data_config(name="folder", root=str(root), image_size=4)
    with pytest.raises(DataError, match=r"no images .* an empty split"):
        sources.make_source(cfg, "train")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "train" / "cat" / "1.png")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class folder\(s\) \['dog'\] .* hold no images"):
        pipeline.train_loader(cfg, global_batch_size=1, seed=0)
    # A test split may lack a class (its folder missing or empty): it is read as it is.
    (root / "test" / "cat").mkdir(parents=True)
    (root / "test" / "dog").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "test" / "cat" / "1.png")
    assert len(sources.make_source(cfg, "test")) == 1
    (root / "test" / "bird").mkdir()  # but no class the training split does not have
    with pytest.raises(DataError, match=r"class folders \['bird'\] .* are missing from .*train"):
        sources.make_source(cfg, "test")


class _LabelledArrays:
    """A source whose records carry the given labels (like a TFDS ClassLabel source)."""

    num_classes = 3

    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"image": np.zeros((4, 4, 3), np.uint8), "label": self.labels[index],
                "id": f"fake/train[{index}]"}


@pytest.mark.parametrize("labels, bad", [([0, 1, 5, 2], 5), ([0, -2, 1, 2], -2)])
def test_labels_out_of_range_are_refused(monkeypatch, labels, bad):
    """Labels enter through the sources: every decoded record is checked against num_classes."""
    decoded = pipeline.DecodedSource(_LabelledArrays(labels), 4)
    with pytest.raises(DataError, match=rf"label {bad}, outside \[0, 3\)"):
        [decoded[i] for i in range(len(labels))]
    monkeypatch.setattr(pipeline, "make_source", lambda cfg, split: _LabelledArrays(labels))
    cfg = presets.data_config(image_size=4)
    with pytest.raises(DataError, match=rf"fake/train\[\d\] has label {bad}"):
        next(iter(pipeline.train_loader(cfg, global_batch_size=4, seed=0)))


def test_unlabelled_split_trains_but_is_not_evaluated(monkeypatch):
    """Label -1 (an unlabelled split, e.g. STL-10's) is fine for pre-training, which reads no
    labels, and refused by the evaluation's reader. (It used to pass as "undecodable".)"""
    labels = [-1] * 4
    monkeypatch.setattr(pipeline, "make_source", lambda cfg, split: _LabelledArrays(labels))
    cfg = presets.data_config(image_size=4)
    batch = next(iter(pipeline.train_loader(cfg, global_batch_size=4, seed=0)))
    assert batch["image"].shape == (4, 4, 4, 3) and list(batch["label"]) == labels
    with pytest.raises(DataError, match=r"label -1, outside \[0, 3\).*not evaluated"):
        next(pipeline.eval_batches(cfg, "test", batch_size=4))


def test_unknown_tfds_name_is_not_downloaded(tmp_path):
    for source, match in (("tfds", r"'no_such_dataset' is not prepared in .*tfds build "
                                   r"no_such_dataset --file_format=array_record"),
                          ("auto", r"no data for data.name='no_such_dataset'.*data.root")):
        cfg = presets.data_config(name="no_such_dataset", source=source, data_dir=str(tmp_path))
        with pytest.raises(DataError, match=match):
            sources.make_source(cfg, "train")
    assert not os.listdir(tmp_path)  # no download was attempted


# --- Workdirs and checkpoints -------------------------------------------------------------------

def test_workdir_of_another_method_or_without_config_json(tmp_path):
    run = tmp_path / "run"
    ckpt_lib.check_workdir(run, _config())
    dino = dino_config.get_config(RUNLOCAL)
    with pytest.raises(ckpt_lib.WorkdirError, match="holds a run with method='simclr'.*new "
                                                    "--workdir"):
        ckpt_lib.check_workdir(run, dino)
    orphan = tmp_path / "orphan"
    (orphan / "checkpoints" / "3").mkdir(parents=True)
    with pytest.raises(ckpt_lib.WorkdirError, match="holds checkpoints but no config.json"):
        ckpt_lib.check_workdir(orphan, _config())
    assert sorted(os.listdir(orphan)) == ["checkpoints"]


def test_evaluation_requests_that_do_not_fit_the_run(tmp_path):
    ckpt_lib.check_workdir(tmp_path, _config())  # a run's config.json, no checkpoint yet
    cases = [
        (["model.width_multiplier=0.25"], r"config\.model\.width_multiplier=0\.25 does not match "
         r"the run, which has model\.width_multiplier=0\.125"),
        (["simclr.proj_out_dim=16"], r"--config\.simclr\.proj_out_dim=16 changes the "
         r"checkpointed state .*\(32,\).*\(16,\)"),
        (["eval.knn_k=0"], r"config\.eval\.knn_k: must be >= 1"),
        (["eval.batch_size=12"], r"config\.eval\.batch_size: must be a positive multiple of the "
         "device count 8"),
        (["eval.probe_normalize=zscore"], r"config\.eval\.probe_normalize: must be one of"),
    ]
    for overrides, match in cases:
        with pytest.raises(ConfigError, match=match):
            evaluate_job.evaluate(str(tmp_path), overrides)
    # Overrides that keep the state's shapes pass the check; then there is no checkpoint.
    with pytest.raises(ckpt_lib.WorkdirError, match="no checkpoint in .*train first"):
        evaluate_job.evaluate(str(tmp_path), ["simclr.temperature=0.3", "eval.knn_k=5"])
    assert sorted(os.listdir(tmp_path)) == ["config.json"]


def test_unwritable_workdir_under_a_regular_file(tmp_path, capsys):
    """Tests run as root, whom chmod 0o500 does not stop; a path through a regular file refuses
    every user (ENOTDIR). test_read_only_workdir below uses a real read-only mount."""
    blocker = tmp_path / "a_file"
    blocker.write_text("precious")
    workdir = blocker / "run"
    code, err = _guarded_exit(lambda argv: train.train(_config(), str(workdir)), capsys)
    assert code == cli.EXIT_OS_ERROR
    assert err.strip() == (f"error: Not a directory (errno {errno.ENOTDIR}) at {workdir}: a part "
                           "of the path is a file, not a directory: choose another path")
    assert blocker.read_text() == "precious"


def test_read_only_workdir(tmp_path):
    """A read-only file system (EROFS), as root too: a tmpfs mounted read-only in a private
    mount namespace. Skipped where mounting is not permitted."""
    mount = tmp_path / "ro"
    mount.mkdir()
    script = 'mount -t tmpfs -o ro,size=1m tmpfs "$0" && exec "$@"'
    probe = subprocess.run(["unshare", "-m", "sh", "-c", script, str(mount), "true"],
                           capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode:
        pytest.skip("no private mount namespace here (needs unshare and CAP_SYS_ADMIN)")
    env = {**os.environ, "XLA_FLAGS": xla_env.xla_flags(), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, str(mount), sys.executable, "-m", TRAIN,
         "--config", SIMCLR, "--workdir", str(mount / "run")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == cli.EXIT_OS_ERROR, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: Read-only file system (errno {errno.EROFS}) at {mount / 'run'}: the file system "
        "is read-only: choose a --workdir on a writable disk. Checkpoints written before are "
        "kept; the run resumes from the newest one")


# The error TensorStore raised when a real 2.4 MB tmpfs filled up during the save of step 6.
_TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "opt_state.3.trace.encoder.bn2.bias/0" in OCDBT database '
    'at local file "{d}/": Failed writing: "{d}/d/c25957938aeea115": Failed to write 849024 '
    "bytes to file 21: No space left on device [os_error_code='28']")


def test_full_disk_during_a_save_keeps_the_earlier_checkpoint(tmp_path, capsys, monkeypatch):
    """The save of step 2 fails as Orbax fails on a full disk (a half-written temporary
    directory, TensorStore's RESOURCE_EXHAUSTED error): exit code 3 naming the path, and the
    checkpoint of step 1 intact, restorable, the half-written one ignored."""
    config = _config("data=digits,runlocal,model=vit_ti4", total_steps=2,
                     **{"checkpoint.every_steps": 1})  # a ViT compiles faster than a ResNet
    workdir = tmp_path / "run"
    real_save = ocp.CheckpointManager.save

    def save_on_a_full_disk(self, step, *args, **kwargs):
        if step < 2:
            return real_save(self, step, *args, **kwargs)
        partial = epath.Path(self.directory) / f"{step}.orbax-checkpoint-tmp" / "state" / "ocdbt"
        (partial / "d").mkdir(parents=True)
        (partial / "d" / "c25957938aeea115").write_bytes(b"\0" * 4096)
        raise ValueError(_TENSORSTORE_ENOSPC.format(d=partial))

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_on_a_full_disk)
    code, err = _guarded_exit(lambda argv: train.train(config, str(workdir)), capsys)
    monkeypatch.undo()
    assert code == cli.EXIT_OS_ERROR
    assert err.strip().startswith(
        f"error: No space left on device (errno {errno.ENOSPC}) at {workdir}/checkpoints/"
        "2.orbax-checkpoint-tmp/state/ocdbt/d/c25957938aeea115: the disk is full")
    assert "the run resumes from the newest one" in err
    assert (workdir / "config.json").exists() and (workdir / "metrics.jsonl").exists()
    assert ckpt_lib.ReadOnlyCheckpoints(workdir).all_steps() == [1]
    _, state, step = restore_lib.restore_state(workdir, config, parallel.make_mesh())
    assert step == 1 and int(state["step"]) == 1
    resume = ckpt_lib.RunCheckpoints(workdir)  # what the next start opens
    assert resume.all_steps() == [1] and resume.latest_step() == 1
    resume.close()


def test_cli_maps_os_errors_and_keeps_bugs_tracebacks(capsys):
    def fail(error):
        def main(argv):
            raise error
        return main

    code, err = _guarded_exit(fail(OSError(errno.ENOSPC, "No space left on device",
                                           "/ckpt/7/x")), capsys)
    assert code == 3 and err.startswith("error: No space left on device (errno 28) at /ckpt/7/x")
    code, err = _guarded_exit(fail(ValueError(_TENSORSTORE_ENOSPC.format(d="/w/c"))), capsys)
    assert code == 3 and "at /w/c/d/c25957938aeea115: the disk is full" in err
    code, err = _guarded_exit(fail(ConfigError("config.x: must be > 0")), capsys)
    assert (code, err) == (2, "error: config.x: must be > 0\n")
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        cli.guard(fail(ZeroDivisionError("bug")))(["prog"])

"""The trainer: every config runs, runs are deterministic across a stop and resume, and bad
input gives a clear error without touching what is already in the workdir."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

from configs import simclr as simclr_config
from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import train
from ssl_jax.config import ConfigError
from ssl_jax.data.sources import DataError
from tests import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Pre-training configs; configs/finetune.py (the fine-tuning job's) runs in test_finetune.py,
# and colorization (refused on the greyscale digits) runs one step on a colour image folder in
# test_colorization.py.
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                      if os.path.basename(p) not in ("finetune.py", "colorization.py"))


def _load_config_module(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_runs_one_step(path, tmp_path, request):
    module = _load_config_module(path)
    config = module.get_config("data=digits,runlocal")
    for preset in ("data=cifar10", "data=imagenet2012"):  # the big presets build too
        assert module.get_config(preset).batch_size > 0
    with config.unlocked():
        config.total_steps = 1
        if "beit" in config:  # BEiT predicts the tokens of a trained tokenizer
            config.beit.tokenizer_workdir = request.getfixturevalue("tokenizer_run")
    state = train.train(config, str(tmp_path))
    assert int(state["step"]) == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1
    assert {"loss", "lr", "images_per_sec"} <= set(rows[-1])
    assert np.isfinite(rows[-1]["loss"])
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))


def test_stop_and_resume_equals_uninterrupted(trained_run, tmp_path):
    config, full_dir = trained_run
    train.train(config, str(tmp_path), stop_at_step=3)
    assert ckpt_lib.ReadOnlyCheckpoints(tmp_path).all_steps() == [3]
    resumed = train.train(config, str(tmp_path))  # a new start in the same workdir resumes
    assert int(resumed["step"]) == 6

    from ssl_jax import parallel
    from ssl_jax.evaluate.features import restore_encoder

    mesh = parallel.make_mesh()
    _, full_vars, _ = restore_encoder(full_dir, config, mesh)
    _, resumed_vars, _ = restore_encoder(tmp_path, config, mesh)
    chex.assert_trees_all_equal(full_vars, resumed_vars)
    # Same data position: the saved Grain iterator states agree.
    full_data = sorted(glob.glob(str(full_dir / "checkpoints" / "6" / "data" / "*.json")))
    resumed_data = sorted(glob.glob(str(tmp_path / "checkpoints" / "6" / "data" / "*.json")))
    assert full_data and [os.path.basename(p) for p in full_data] == [
        os.path.basename(p) for p in resumed_data]
    for a, b in zip(full_data, resumed_data, strict=True):
        assert open(a, "rb").read() == open(b, "rb").read()


def test_workdir_of_another_model_is_refused(trained_run):
    _, workdir = trained_run
    before = sorted(os.listdir(workdir / "checkpoints"))
    config = simclr_config.get_config("data=digits,runlocal,model=vit_ti4")
    with pytest.raises(ckpt_lib.WorkdirError, match="new --workdir"):
        train.train(config, str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_batch_not_divisible_by_devices(tmp_path):
    config = simclr_config.get_config("data=digits,runlocal")
    with config.unlocked():
        config.batch_size = 12  # 8 devices in the tests
    with pytest.raises(ValueError, match="batch_size=12 is not divisible by the device count 8"):
        train.train(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_missing_image_folder(tmp_path):
    config = simclr_config.get_config("data=cifar10,runlocal")
    with config.unlocked():
        config.data.root = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="nowhere"):
        train.train(config, str(tmp_path / "run"))


def test_unknown_preset_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'dta'"):
        simclr_config.get_config("dta=digits")
    with pytest.raises(ConfigError, match="unknown data='mnist'"):
        simclr_config.get_config("data=mnist")
    config = simclr_config.get_config("data=digits,runlocal")
    with config.unlocked():
        config.simclr.temperature = 0.0
    with pytest.raises(ConfigError, match="simclr.temperature"):
        train.train(config, str(tmp_path))
    assert not os.listdir(tmp_path)  # a refused config writes nothing into the workdir


def _cli(*args, timeout=120):
    env = dict(os.environ, XLA_FLAGS=xla_env.xla_flags())
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def test_cli_unknown_key_and_wrong_type(tmp_path):
    bad_key = _cli("ssl_jax.train", "--config", "configs/simclr.py:data=digits,runlocal",
                   "--workdir", str(tmp_path), "--config.simclr.temprature=0.2")
    assert bad_key.returncode != 0
    assert "temprature" in bad_key.stderr
    bad_type = _cli("ssl_jax.train", "--config", "configs/simclr.py:data=digits,runlocal",
                    "--workdir", str(tmp_path), "--config.batch_size=many")
    assert bad_type.returncode != 0
    assert "batch_size" in bad_type.stderr
    assert not os.listdir(tmp_path)  # nothing was written


def test_cli_user_error_exit_code(trained_run, tmp_path):
    _, workdir = trained_run
    result = _cli("ssl_jax.train", "--config", "configs/simclr.py:data=digits,runlocal,"
                  "model=vit_ti4", "--workdir", str(workdir))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: workdir" in result.stderr


def test_relative_workdir(tmp_path, monkeypatch):
    """A workdir given relative to the current directory (as in the README) works end to end."""
    monkeypatch.chdir(tmp_path)
    config = simclr_config.get_config("data=digits,runlocal")
    with config.unlocked():
        config.total_steps = 1
    train.train(config, "workdirs/run")
    assert ckpt_lib.ReadOnlyCheckpoints("workdirs/run").all_steps() == [1]
    assert (tmp_path / "workdirs" / "run" / "export" / "1" / "encoder.json").exists()

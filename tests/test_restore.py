"""ssl_jax.restore (read a run back without a CheckpointManager), runs written by an earlier
version (tests/fixtures/runs_58b80cc.tar.gz: resume, restore, their old data-iterator state),
and the data sources' field declarations (the init batch, the pipeline's output)."""

import json
import logging
import os
import tarfile

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import config as config_lib
from ssl_jax import parallel, presets, train
from ssl_jax import restore as restore_lib
from ssl_jax.data import pipeline, sources
from ssl_jax.step import example_batch

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "runs_58b80cc.tar.gz")
# The last line of metrics.jsonl after resuming to step 6 with 58b80cc (fixtures/README.md).
RESUMED_AT_6 = {"simclr": {"loss": 5.781323432922363, "param_norm": 21.29184341430664},
                "dino": {"loss": 5.567551612854004, "param_norm": 19.406330108642578}}


@pytest.fixture
def old_runs(tmp_path):
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(tmp_path, filter="data")
    return tmp_path


@pytest.fixture
def no_checkpoint_manager(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a read-only restore created an Orbax CheckpointManager")

    monkeypatch.setattr(ocp, "CheckpointManager", refuse)


def _listing(directory):
    return sorted((os.path.relpath(os.path.join(d, f), directory),
                   os.path.getsize(os.path.join(d, f)))
                  for d, _, files in os.walk(directory) for f in files)


@pytest.mark.parametrize("run", ["simclr", "dino"])
def test_old_runs_restore_read_only(old_runs, run, no_checkpoint_manager):
    workdir = old_runs / run
    before = _listing(workdir)
    mesh = parallel.make_mesh()
    config, method, state, step = restore_lib.restore_run(workdir, mesh)
    assert step == 3 and int(state["step"]) == 3 and config.method == run
    assert type(method).__name__.lower() == run
    assert restore_lib.checkpoint_steps(workdir) == [3]
    again = restore_lib.restore_state(workdir, config, mesh, step=3)[1]
    chex.assert_trees_all_equal(state, again)
    with pytest.raises(ckpt_lib.WorkdirError, match=r"no checkpoint of step 5 .*\[3\]"):
        restore_lib.restore_state(workdir, config, mesh, step=5)
    assert _listing(workdir) == before  # nothing written, moved or locked


def test_read_only_restore_falls_back_and_keeps_the_bad_checkpoint(old_runs, caplog,
                                                                   no_checkpoint_manager):
    workdir = old_runs / "simclr"
    config = restore_lib.load_run_config(workdir)
    mesh = parallel.make_mesh()
    (workdir / "checkpoints" / "5").mkdir()  # a complete-looking but empty step
    with caplog.at_level(logging.WARNING):
        _, state, step = restore_lib.restore_state(workdir, config, mesh)
    assert step == 3 and int(state["step"]) == 3
    assert f"checkpoint {workdir / 'checkpoints' / '5'} is unreadable" in caplog.text
    assert (workdir / "checkpoints" / "5").is_dir()  # read-only: not moved aside
    with pytest.raises(ckpt_lib.WorkdirError, match="no checkpoint in"):
        restore_lib.restore_state(old_runs / "nowhere", config, mesh)


@pytest.mark.parametrize("run", ["simclr", "dino"])
def test_old_runs_resume_to_the_same_numbers(old_runs, run):
    workdir = old_runs / run
    config = config_lib.from_json((workdir / "config.json").read_text())
    state = train.train(config, str(workdir))
    assert int(state["step"]) == 6
    last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 6
    for key, expected in RESUMED_AT_6[run].items():
        np.testing.assert_allclose(last[key], expected, rtol=1e-4, err_msg=key)
    saved = json.loads((workdir / "checkpoints" / "6" / "data" / "process_0-of-1.json")
                       .read_text())
    assert saved["start"] == 48 and saved["grain"] == {"next_index": 48}  # 3 steps of 16 more


@pytest.mark.parametrize("run", ["simclr", "dino"])
def test_old_runs_evaluate_and_finetune(old_runs, run):
    """The jobs that read a run (evaluation, fine-tuning) accept a run of 58b80cc as it is: its
    checkpoint stays untouched, the results land beside it."""
    from ssl_jax.evaluate import __main__ as evaluate_job
    from ssl_jax.finetuning import job as finetune_job

    workdir = old_runs / run
    checkpoints = _listing(workdir / "checkpoints")
    results = evaluate_job.evaluate(str(workdir), [
        "eval.max_train_examples=256", "eval.max_test_examples=128", "eval.probe_epochs=2",
        "eval.random_init_baseline=False", "eval.attention_images=0"])
    assert results["step"] == 3 and results["method"] == run
    probe = results["ssl"]["linear_top1"]
    assert abs(probe * 128 - round(probe * 128)) < 1e-6  # a share of the 128 test images
    ft = finetune_job.finetune(str(workdir), "configs/finetune.py:data=digits,runlocal")
    assert ft["init"] == "pretrained" and ft["checkpoint_step"] == 3 and ft["method"] == run
    assert ft["steps"] == 6 and abs(ft["test_top1"] * ft["num_test"]
                                    - round(ft["test_top1"] * ft["num_test"])) < 1e-6
    assert (workdir / "finetune").is_dir() and (workdir / "eval.json").is_file()
    assert _listing(workdir / "checkpoints") == checkpoints


def test_old_data_loader_state_is_converted_exactly(old_runs):
    config = restore_lib.load_run_config(old_runs / "simclr")
    old = json.loads((old_runs / "simclr/checkpoints/3/data/process_0-of-1.json").read_text())
    assert "last_seen_indices" in old  # written by the DataLoader iterator
    loader = pipeline.train_loader(config.data, global_batch_size=config.batch_size, seed=0)
    fresh = iter(loader)
    expected = [next(fresh) for _ in range(5)][3:]
    resumed = iter(loader)
    resumed.set_state(old)
    for want in expected:
        got = next(resumed)
        assert set(got) == set(want) == {"image", "label"}
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    assert resumed.get_state()["start"] == 48
    with pytest.raises(sources.DataError, match="the data config changed"):
        iter(pipeline.train_loader(config.data, global_batch_size=config.batch_size,
                                   seed=1)).set_state(old)


def test_old_data_loader_state_with_workers_restarts_with_a_warning(old_runs, caplog):
    config = restore_lib.load_run_config(old_runs / "simclr")
    old = json.loads((old_runs / "simclr/checkpoints/3/data/process_0-of-1.json").read_text())
    old.update(worker_count=2, last_seen_indices={"0": 44, "1": 47}, last_worker_index=1)
    with config.unlocked():
        config.data.num_workers = 2
    it = iter(pipeline.train_loader(config.data, global_batch_size=16, seed=0))
    with caplog.at_level(logging.WARNING):
        it.set_state(old)
    assert it._start == 48 and "not bit for bit" in caplog.text  # (get_state would start workers)
    with config.unlocked():
        config.data.num_workers = 0
    with pytest.raises(sources.DataError, match="num_workers=2"):
        iter(pipeline.train_loader(config.data, global_batch_size=16, seed=0)).set_state(old)


# --- Fields declared by the source ---------------------------------------------------------------

class _CaptionedFolder(sources.ImageFolderSource):
    """An image folder whose examples also carry 4 int32 token ids (as CLIP's text will)."""

    @classmethod
    def fields(cls, data_cfg):
        return {**sources.image_label_fields(data_cfg.image_size),
                "tokens": sources.Field((4,), "int32")}

    def __getitem__(self, index):
        return {**super().__getitem__(index), "tokens": np.arange(4) + index}


def test_example_batch_and_pipeline_follow_the_declared_fields(tmp_path, monkeypatch):
    from PIL import Image

    # The layout of a state needs no data: ImageNet's fields, nothing prepared, no root.
    absent = presets.data_config(name="imagenet2012", image_size=224)
    assert sources.source_fields(absent) == sources.image_label_fields(224)
    for i in range(8):
        (tmp_path / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 6), (i, 0, 0)).save(tmp_path / "train" / f"c{i % 2}" / f"{i}.png")
    monkeypatch.setitem(sources.SOURCE_CLASSES, "folder", _CaptionedFolder)
    data = presets.data_config(name="folder", root=str(tmp_path), image_size=8)
    config = config_lib.from_json(json.dumps({"data": data.to_dict()}))
    mesh = parallel.make_mesh()
    batch = example_batch(config, mesh)
    n = len(jax.devices())
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "image": ((n, 8, 8, 3), np.uint8), "label": ((n,), np.int32),
        "tokens": ((n, 4), np.int32)}
    assert not any(np.asarray(v).any() for v in batch.values())
    train_batch = next(iter(pipeline.train_loader(data, global_batch_size=4, seed=0)))
    assert set(train_batch) == {"image", "label", "tokens"}
    assert train_batch["tokens"].shape == (4, 4) and train_batch["tokens"].dtype == np.int32
    (eval_batch,) = pipeline.eval_batches(data, "train", batch_size=16)
    assert set(eval_batch) == {"image", "label", "tokens", "mask"}
    np.testing.assert_array_equal(eval_batch["tokens"][:8], np.arange(4) + np.arange(8)[:, None])
    assert not eval_batch["tokens"][8:].any() and int(eval_batch["mask"].sum()) == 8


_WORKERS_SCRIPT = '''
import json, sys
import numpy as np
from absl import app
from ssl_jax import presets
from ssl_jax.data import pipeline, sources


def main(_):
    cfg = presets.data_config(image_size=8, num_workers=2)
    it = iter(pipeline.train_loader(cfg, global_batch_size=16, seed=0))
    [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    after = [next(it) for _ in range(2)]
    resumed = iter(pipeline.train_loader(cfg, global_batch_size=16, seed=0))
    resumed.set_state(state)
    for a in after:
        b = next(resumed)
        assert set(b) == {"image", "label"}
        np.testing.assert_array_equal(a["image"], b["image"])
    print("resumed exactly")


if __name__ == "__main__":
    app.run(main)
'''


def test_worker_processes_resume_exactly(tmp_path):
    """``data.num_workers=2`` (Grain's ``mp_prefetch``, spawned processes: a script of its own)."""
    import subprocess
    import sys

    script = tmp_path / "workers.py"
    script.write_text(_WORKERS_SCRIPT)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0 and "resumed exactly" in done.stdout, done.stderr[-3000:]

"""Faults: a preemption notice (SIGTERM), SIGKILL at any moment, corrupt checkpoints, non-finite
values. Whatever happens, a restarted run ends with the same state and data position, bit for
bit, as one that was never interrupted.

Trainer runs are subprocesses on 1 CPU device of the same 40-step SimCLR
run (``data=digits,runlocal``), so that they share one uninterrupted reference run and a
persistent compilation cache (the session's). Faults are injected by ``tests/fault_driver.py``.
"""

import glob
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import pytest

from configs import simclr as simclr_config
from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import faults, methods, parallel
from ssl_jax import restore as restore_lib
from ssl_jax.data import pipeline
from ssl_jax.step import build_state
from tests import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 40
RUN_FLAGS = ("--config", "configs/simclr.py:data=digits,runlocal",
             f"--config.total_steps={TOTAL_STEPS}", "--config.checkpoint.async_save=True")


@pytest.fixture(scope="module")
def run_env():
    """Environment of the subprocess runs: 1 device; the session's compile options and
    compilation cache (tests/xla_env.py)."""
    return dict(
        os.environ, XLA_FLAGS=xla_env.xla_flags(), JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
        SSL_JAX_PEAK_FLOPS="1e11",  # skips the peak measurement at every start (mfu metric)
    )


def _command(workdir, *flags, fault=""):
    if fault:
        return [sys.executable, os.path.join(REPO, "tests", "fault_driver.py"), *RUN_FLAGS,
                "--workdir", str(workdir), f"--fault={fault}", *flags]
    return [sys.executable, "-m", "ssl_jax.train", *RUN_FLAGS, "--workdir", str(workdir),
            *flags]


def _run(env, workdir, *flags, fault=""):
    return subprocess.run(_command(workdir, *flags, fault=fault), capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=600)


def _steps(workdir):
    """Finalised checkpoint steps (Orbax renames a checkpoint to ``<step>`` once complete)."""
    return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


def _metrics(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


@pytest.fixture(scope="module")
def reference(run_env, tmp_path_factory):
    """The uninterrupted run: its workdir, with checkpoints 20, 30 and 40."""
    workdir = tmp_path_factory.mktemp("reference")
    done = _run(run_env, workdir, "--config.checkpoint.every_steps=10")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _steps(workdir) == [20, 30, 40]
    return workdir


def _restore(workdir, step=-1):
    config = simclr_config.get_config("data=digits,runlocal")
    return restore_lib.restore_state(workdir, config, parallel.make_mesh(), step)[1:]


def assert_same_as_reference(reference, workdir):
    """Whole train state and Grain iterator state of step 40 equal the reference run's."""
    state, step = _restore(workdir)
    expected, _ = _restore(reference)
    assert step == TOTAL_STEPS
    chex.assert_trees_all_equal(state, expected)
    data_position = f"checkpoints/{TOTAL_STEPS}/data/process_0-of-1.json"
    assert (workdir / data_position).read_bytes() == (reference / data_position).read_bytes()


# --- Preemption -------------------------------------------------------------------------------


def test_preemption_watcher_flags_sigterm_and_restores_the_handler():
    def previous(signum, frame):
        pass

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with faults.PreemptionWatcher() as watcher:
            assert not watcher.reached(1, lambda step: True)  # one process: the flag decides
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert watcher.signalled() and watcher.reached(2, lambda step: False)
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


def test_multi_process_preemption_asks_the_sync_point(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    before = signal.getsignal(signal.SIGTERM)
    asked = []
    with faults.PreemptionWatcher() as watcher:
        assert signal.getsignal(signal.SIGTERM) is before  # JAX's own notifier handles SIGTERM
        assert not watcher.reached(5, lambda step: asked.append(step) or False)
        assert watcher.reached(6, lambda step: asked.append(step) or step == 6)
    assert asked == [5, 6]


def test_sigterm_saves_the_current_step_exits_75_and_resumes_exactly(run_env, reference,
                                                                      tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        _command(workdir, "--config.checkpoint.every_steps=1000", "--config.log_every=1"),
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO, env=run_env)
    try:
        deadline = time.time() + 300
        while not ((workdir / "metrics.jsonl").exists() and _metrics(workdir)
                   and _metrics(workdir)[-1]["step"] >= 2):
            assert process.poll() is None and time.time() < deadline, "no progress"
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        stderr = process.communicate(timeout=300)[1]
    finally:
        process.kill()
    stopped = _metrics(workdir)[-1]["step"]
    assert process.returncode == faults.EXIT_PREEMPTED, stderr[-3000:]
    assert 2 <= stopped < TOTAL_STEPS, "the run ended before SIGTERM arrived"
    assert f"preempted: saved the checkpoint of step {stopped}" in stderr
    assert _steps(workdir) == [stopped]  # the step it stopped at, not a periodic checkpoint
    resumed = _run(run_env, workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {workdir} from step {stopped}" in resumed.stderr
    assert_same_as_reference(reference, workdir)


# --- SIGKILL at any moment --------------------------------------------------------------------

# (fault, finalised checkpoints afterwards): every 10 steps a checkpoint, saved asynchronously.
KILLS = (
    ("batch:15", [10]),  # during step 15, between checkpoints
    ("commit:20", [10]),  # during the asynchronous save of step 20, just before it is final
    ("restore", [10]),  # during start-up, after the checkpoint of step 10 was read
    ("saved:30", [10, 20, 30]),  # right after the checkpoint of step 30 completed
)


def test_sigkill_at_four_points_then_resume_equals_uninterrupted(run_env, reference, tmp_path):
    workdir = tmp_path / "run"
    for fault, steps_after in KILLS:
        killed = _run(run_env, workdir, "--config.checkpoint.every_steps=10", fault=fault)
        assert killed.returncode == -signal.SIGKILL, (fault, killed.stderr[-3000:])
        assert "fault_driver: SIGKILL" in killed.stderr
        assert _steps(workdir) == steps_after, fault
        if fault.startswith("commit"):  # the kill really came mid-save: only a temporary dir
            assert glob.glob(str(workdir / "checkpoints" / "20.orbax-checkpoint-tmp*"))
    # And the newest checkpoint got damaged on disk as well: the run falls back past it.
    _truncate(workdir / "checkpoints" / "30")
    final = _run(run_env, workdir, "--config.checkpoint.every_steps=10")
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"checkpoint {workdir}/checkpoints/30 is unreadable" in final.stderr
    assert f"resumed {workdir} from step 20" in final.stderr
    assert _steps(workdir) == [20, 30, 40]
    assert len(glob.glob(str(workdir / "checkpoints" / "30.corrupt-*"))) == 1
    assert not glob.glob(str(workdir / "checkpoints" / "*tmp*"))
    assert_same_as_reference(reference, workdir)


# --- Corrupt checkpoints ----------------------------------------------------------------------


def _largest_array_file(step_dir):
    files = glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_array_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def _garble_array_data(step_dir):
    path = _largest_array_file(step_dir)
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    open(path, "wb").write(data)


def _garble_metadata(step_dir):
    path = step_dir / "state" / "_METADATA"
    data = bytearray(path.read_bytes())
    data[100:164] = bytes(b ^ 0x5A for b in data[100:164])
    path.write_bytes(data)


def _delete_array_file(step_dir):
    os.remove(_largest_array_file(step_dir))


def _garble_data_position(step_dir):
    (step_dir / "data" / "process_0-of-1.json").write_text("{garbled")


def _listing(directory):
    return sorted((os.path.relpath(p, directory), os.path.getsize(p))
                  for p in glob.glob(str(directory / "**"), recursive=True) if os.path.isfile(p))


def _abstract_state_and_data():
    config = simclr_config.get_config("data=digits,runlocal")
    mesh = parallel.make_mesh()
    method = methods.create(config, mesh, total_steps=TOTAL_STEPS, steps_per_epoch=89)
    abstract = build_state(config, mesh, method, TOTAL_STEPS, 89).abstract
    loader = pipeline.train_loader(config.data, global_batch_size=config.batch_size,
                                   seed=config.seed)
    return abstract, iter(loader)


@pytest.mark.parametrize("corrupt", [_truncate, _garble_array_data, _garble_metadata,
                                     _delete_array_file, _garble_data_position],
                         ids=lambda f: f.__name__.strip("_"))
def test_corrupt_latest_checkpoint_warns_falls_back_and_is_kept(reference, tmp_path, corrupt,
                                                               caplog):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    bad = workdir / "checkpoints" / "40"
    corrupt(bad)
    corrupt_files = _listing(bad)
    good = {step: _listing(workdir / "checkpoints" / str(step)) for step in (20, 30)}
    abstract, data_iter = _abstract_state_and_data()

    with caplog.at_level(logging.WARNING):
        read_only = ckpt_lib.ReadOnlyCheckpoints(workdir)  # evaluation: only reads
        assert read_only.restore_latest_good(abstract, data_iter)[0] == 30
        read_only.close()
        assert _steps(workdir) == [20, 30, 40]
        checkpoints = ckpt_lib.RunCheckpoints(workdir)
        step, state = checkpoints.restore_latest_good(abstract, data_iter)
    assert step == 30
    assert f"checkpoint {bad} is unreadable" in caplog.text
    moved = glob.glob(str(bad) + ".corrupt-*")
    assert len(moved) == 1 and f"moved the unreadable checkpoint {bad} aside" in caplog.text
    assert _listing(pathlib.Path(moved[0])) == corrupt_files  # kept as it was, not deleted
    for step, listing in good.items():
        assert _listing(workdir / "checkpoints" / str(step)) == listing

    # The run can save step 40 again (resumed at 30, it reaches 40 once more).
    checkpoints.save(40, state, data_iter)
    checkpoints.wait()
    assert _steps(workdir) == [20, 30, 40]
    assert checkpoints.restore(40, abstract)["step"] == 30  # the state saved just now
    checkpoints.close()


def test_wrong_array_data_that_decodes_is_caught_by_the_fingerprint(reference, tmp_path):
    # Arrays that decode cleanly but hold other values: step 30's state files under step 40's
    # fingerprint. (Garbled bytes are no sure test of this: inside zstd frames they may decode
    # to wrong values or fail to decode, depending on where they land.)
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    checkpoints_dir = workdir / "checkpoints"
    shutil.rmtree(checkpoints_dir / "40" / "state")
    shutil.copytree(checkpoints_dir / "30" / "state", checkpoints_dir / "40" / "state")
    abstract, _ = _abstract_state_and_data()
    checkpoints = ckpt_lib.ReadOnlyCheckpoints(workdir)
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match="checkpoints/40 is corrupt"):
        checkpoints.restore(40, abstract)
    checkpoints.close()


def test_no_readable_checkpoint_is_an_error_and_changes_nothing(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    for step in (20, 30, 40):
        _truncate(workdir / "checkpoints" / str(step))
    before = _listing(workdir)
    abstract, data_iter = _abstract_state_and_data()
    checkpoints = ckpt_lib.RunCheckpoints(workdir)
    with pytest.raises(ckpt_lib.WorkdirError, match="none of the checkpoints"):
        checkpoints.restore_latest_good(abstract, data_iter)
    checkpoints.close()
    assert _listing(workdir) == before


# --- Non-finite values ------------------------------------------------------------------------


def test_nonfinite_step_is_skipped_and_counted(run_env, tmp_path):
    workdir = tmp_path / "run"
    done = _run(run_env, workdir, "--config.checkpoint.every_steps=1",
                "--config.checkpoint.keep=10", "--config.log_every=1", "--stop_at_step=6",
                fault="nan:4")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["step"]: row for row in _metrics(workdir)}
    assert rows[4]["loss"] == "nan" and rows[4]["nonfinite_steps"] == 1
    assert rows[3]["nonfinite_steps"] == 0 and rows[6]["nonfinite_steps"] == 1
    assert "1 non-finite step(s) skipped up to step 4" in done.stderr
    before, _ = _restore(workdir, 3)
    skipped, _ = _restore(workdir, 4)
    after, _ = _restore(workdir, 5)
    for key in ("params", "extra", "opt_state"):  # the bad step changed nothing
        chex.assert_trees_all_equal(skipped[key], before[key])
    assert int(skipped["step"]) == 4 and int(skipped["nonfinite_steps"]) == 1
    with pytest.raises(AssertionError):  # and training went on
        chex.assert_trees_all_equal(after["params"], skipped["params"])


def test_nonfinite_stop_names_the_step_keeps_the_last_good_checkpoint_and_resumes(
        run_env, reference, tmp_path):
    workdir = tmp_path / "run"
    stopped = _run(run_env, workdir, "--config.checkpoint.every_steps=2",
                   "--config.on_nonfinite=stop", fault="nan:4")
    assert stopped.returncode == faults.EXIT_NONFINITE, stopped.stderr[-3000:]
    assert "error: non-finite loss (nan) or gradient norm (nan) at step 4" in stopped.stderr
    assert "the last good checkpoint is step 2" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert _steps(workdir) == [2]  # step 4 (a save step) was not saved after the bad step
    resumed = _run(run_env, workdir, "--config.checkpoint.every_steps=10",
                   "--config.on_nonfinite=stop")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {workdir} from step 2" in resumed.stderr
    assert_same_as_reference(reference, workdir)

"""Multi-host training: 2 processes x 2 CPU devices, joined by ``jax.distributed`` over loopback
(gloo collectives), train exactly as 1 process x 4 devices: same data in the same order, same
augmentations, same parameters and losses; only process 0 writes metrics."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import parallel
from ssl_jax import restore as restore_lib
from ssl_jax.data import pipeline
from tests import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/simclr.py:data=digits,runlocal"
STEPS = 3
TIMEOUT_S = 240  # all three processes together; a hung collective fails, it cannot block


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, devices: int, log_path, flags=(), env_extra=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSL_JAX_")}
    env.update(XLA_FLAGS=xla_env.xla_flags(devices),
               JAX_PLATFORMS="cpu", **(env_extra or {}))
    command = [sys.executable, "-m", "ssl_jax.train", "--config", CONFIG,
               "--workdir", str(workdir), f"--config.total_steps={STEPS}",
               "--config.log_every=1", *flags]
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_all(procs: dict[str, tuple[subprocess.Popen, str]], timeout: float) -> None:
    """Waits for every process; on a timeout or a failure kills the rest and fails with logs."""
    deadline = time.monotonic() + timeout
    failed = ""
    try:
        for name, (proc, _) in procs.items():
            try:
                code = proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                failed = f"{name} still running after {timeout:.0f} s"
                break
            if code != 0:
                failed = f"{name} exited with {code}"
                break
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if failed:
        tails = "\n".join(f"--- {name}:\n{open(log).read()[-3000:]}"
                          for name, (_, log) in procs.items())
        pytest.fail(f"{failed}\n{tails}")


def _metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one(tmp_path):
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    from configs import simclr as simclr_config

    # Prepare the built-in data once here rather than in three processes at once.
    pipeline.num_examples(simclr_config.get_config(CONFIG.split(":")[1]).data, "train")
    address = f"127.0.0.1:{_free_port()}"
    procs = {
        # Process 0 takes the coordinator from flags, process 1 from the environment.
        "process 0 of 2": (_start(two, 2, tmp_path / "p0.log", flags=(
            f"--coordinator_address={address}", "--num_processes=2", "--process_id=0")),
            tmp_path / "p0.log"),
        "process 1 of 2": (_start(two, 2, tmp_path / "p1.log", env_extra=dict(
            SSL_JAX_COORDINATOR=address, SSL_JAX_NUM_PROCESSES="2", SSL_JAX_PROCESS_ID="1")),
            tmp_path / "p1.log"),
        "1 process": (_start(one, 4, tmp_path / "single.log"), tmp_path / "single.log"),
    }
    _wait_all(procs, TIMEOUT_S)
    assert "over 2 process(es)" in (tmp_path / "p1.log").read_text()

    # Only process 0 writes metrics (one row per step) and TensorBoard events.
    rows_one, rows_two = _metrics(one), _metrics(two)
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [1, 2, 3]
    assert len(list(two.glob("events.out.tfevents.*"))) == 1
    for key in ("loss", "grad_norm", "contrastive_acc"):
        np.testing.assert_allclose([r[key] for r in rows_two], [r[key] for r in rows_one],
                                   rtol=1e-5, atol=1e-6, err_msg=key)
    # Each process saved its own data position; the state was written collectively.
    data_dir = two / "checkpoints" / str(STEPS) / "data"
    assert sorted(p.name for p in data_dir.glob("*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]

    # The whole final state (params, BatchNorm statistics, optimizer) agrees.
    config = ckpt_lib.load_run_config(two)
    assert config == ckpt_lib.load_run_config(one)
    mesh = parallel.make_mesh()
    _, state_one, step_one = restore_lib.restore_state(one, config, mesh)
    _, state_two, step_two = restore_lib.restore_state(two, config, mesh)
    assert step_one == step_two == STEPS
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64)
                                                                    - np.asarray(b)))),
                                   state_one["params"], state_two["params"])
    print(f"max |params(2 processes) - params(1 process)| = "
          f"{max(jax.tree_util.tree_leaves(diffs)):.3g}")
    chex.assert_trees_all_close(state_two, state_one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_batches_concatenate_to_the_global_batch(process_count):
    """Process ``p``'s batch is rows ``[p * B / P, (p + 1) * B / P)`` of the 1-process batch,
    across an epoch boundary too (1,437 digits, 100 batches of 16)."""
    from configs import simclr as simclr_config

    data = simclr_config.get_config(CONFIG.split(":")[1]).data

    def take(loader, n=100):
        it = iter(loader)
        return [next(it) for _ in range(n)]

    single = take(pipeline.train_loader(data, global_batch_size=16, seed=0))
    shares = [take(pipeline.train_loader(data, global_batch_size=16, seed=0, process_index=p,
                                         process_count=process_count))
              for p in range(process_count)]
    for t, batch in enumerate(single):
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([share[t][key] for share in shares]), batch[key])


def test_process_rows_single_process():
    """In one process every row of the global batch is local, in one block."""
    mesh = parallel.make_mesh(fsdp=2)
    assert parallel.process_rows(mesh, 16) == [(0, 16)]

"""The launch scripts: what --dry-run prints (and that it runs nothing), that the printed
commands are the ones executed, bad input, and one real local run of train + evaluate."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ("local.sh", "gpu_multiprocess.sh", "tpu_vm.sh")
# An override with spaces and both kinds of quotes: it must reach python as one argument.
TRICKY = """--config.data.name=it's a "b" c"""
CONFIG = "configs/simclr.py:data=digits,runlocal"


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH directory whose gcloud/python/python3 only record their calls (one record per call,
    arguments separated by \\x1f) and exit 0, or 5 when an argument contains $FAIL_ON."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = f"""#!/usr/bin/env bash
{{ printf '%s\\x1f' "$(basename "$0")" "$@"; printf '\\x1e'; }} >> {shlex.quote(str(calls))}
if [[ -n ${{FAIL_ON:-}} && "$*" == *"$FAIL_ON"* ]]; then exit 5; fi
"""
    for name in ("gcloud", "python", "python3"):
        _write_exe(bin_dir / name, fake)
    return bin_dir, calls


def recorded_calls(calls: Path) -> list[list[str]]:
    if not calls.exists():
        return []
    return [rec.split("\x1f")[:-1] for rec in calls.read_text().split("\x1e") if rec]


def launch(script: str, *args: str, path: Path | None = None, extra_env: dict | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SSL_JAX_MALLOC_LIB_DIRS"] = ""  # no jemalloc/tcmalloc, whatever this machine has
    if path is not None:
        env["PATH"] = f"{path}{os.pathsep}{env['PATH']}"
    env.update(extra_env or {})
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


def printed(result: subprocess.CompletedProcess) -> list[list[str]]:
    """The commands a script printed ("+ " lines), split as a shell would split them."""
    assert result.returncode == 0, result.stderr
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def remote_command(cmd: list[str]) -> list[str]:
    """The words of the --command=... of a `gcloud ... tpu-vm ssh` line."""
    [value] = [a[len("--command="):] for a in cmd if a.startswith("--command=")]
    return shlex.split(value)


def after(words: list[str], first: str) -> list[str]:
    return words[words.index(first):]


def env_of(cmd: list[str]) -> dict[str, str]:
    """The VAR=value words of an `env VAR=value ... program` command."""
    assert cmd[0] == "env", cmd
    variables = {}
    for word in cmd[1:]:
        if "=" not in word:
            return variables
        name, value = word.split("=", 1)
        variables[name] = value
    return variables


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_strict_bash_with_help(script):
    path = LAUNCH / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert "set -euo pipefail" in path.read_text()
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    result = launch(script, "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout and "--dry-run" in result.stdout


def test_tpu_vm_dry_run_creates_copies_installs_runs_all_workers_and_deletes(fake_bin):
    bin_dir, calls = fake_bin
    result = launch(
        "tpu_vm.sh", "--dry-run", "--create", "--spot", "--delete-after", "--name", "ssl-pod",
        "--zone=us-central2-b", "--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base",
        "--project", "my-proj", "--workdir", "gs://bkt/runs/a", "--data-dir", "gs://bkt/tfds",
        "--config", CONFIG, "--eval-arg=--config.eval.knn_k=10", "--", TRICKY, "--stop_at_step=4",
        path=bin_dir)
    cmds = printed(result)
    assert recorded_calls(calls) == [], "--dry-run ran something"
    assert [c[:5] for c in cmds] == [["gcloud", "compute", "tpus", "tpu-vm", verb] for verb in
                                     ("create", "ssh", "scp", "ssh", "ssh", "ssh", "delete")]
    for cmd in cmds:
        assert cmd[5] == "ssl-pod" or cmd[5:7] == ["--recurse", str(ROOT)], cmd
        assert "--zone=us-central2-b" in cmd and "--project=my-proj" in cmd
    create, clean, scp, install, train, evaluate, delete = cmds
    assert {"--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"} <= set(create)
    assert scp[7] == "ssl-pod:ssl_jax" and "--worker=all" in scp
    assert remote_command(clean) == ["rm", "-rf", "ssl_jax"]
    assert after(remote_command(install), "cd") == [
        "cd", "ssl_jax", "&&", "python3", "-m", "pip", "install", "-q", "-e", ".", "jax[tpu]",
        "gcsfs"]
    assert all("--worker=all" in c for c in (clean, install, train, evaluate))
    assert remote_command(train) == [
        "cd", "ssl_jax", "&&", "SSL_JAX_DISTRIBUTED=auto", "TFDS_DATA_DIR=gs://bkt/tfds",
        "python3", "-m", "ssl_jax.train", "--config", CONFIG, "--workdir", "gs://bkt/runs/a",
        "--config.data.data_dir=gs://bkt/tfds", TRICKY, "--stop_at_step=4"]
    assert after(remote_command(evaluate), "SSL_JAX_DISTRIBUTED=auto") == [
        "SSL_JAX_DISTRIBUTED=auto", "TFDS_DATA_DIR=gs://bkt/tfds", "python3", "-m",
        "ssl_jax.evaluate", "--workdir", "gs://bkt/runs/a", "--config.eval.knn_k=10"]
    assert delete[6:] == ["--zone=us-central2-b", "--project=my-proj", "--quiet"]


def test_tpu_vm_git_repo_is_cloned_and_skip_setup_only_runs_jobs(fake_bin):
    bin_dir, _ = fake_bin
    common = ("--dry-run", "--name", "v", "--zone", "europe-west4-a", "--workdir", "gs://b/w",
              "--jobs", "evaluate,finetune", "--finetune-arg=--config.label_fraction=0.1")
    url = "https://github.com/someone/ssl_jax.git"
    install, evaluate, finetune = printed(launch("tpu_vm.sh", *common, "--repo", url,
                                                 path=bin_dir))
    assert "git" in remote_command(install) and url in remote_command(install)
    assert remote_command(evaluate)[-3:] == ["ssl_jax.evaluate", "--workdir", "gs://b/w"]
    assert remote_command(finetune)[-4:] == ["ssl_jax.finetune", "--workdir", "gs://b/w",
                                             "--config.label_fraction=0.1"]
    assert printed(launch("tpu_vm.sh", *common, "--skip-setup", path=bin_dir)) == [
        evaluate, finetune]


def test_tpu_vm_runs_what_it_prints_and_deletes_the_vm_after_a_failure(fake_bin):
    bin_dir, calls = fake_bin
    args = ("--name", "v", "--zone", "z", "--accelerator-type", "v4-8", "--version", "rt",
            "--create", "--delete-after", "--workdir", "gs://b/w", "--config", CONFIG, "--", TRICKY)
    expected = printed(launch("tpu_vm.sh", "--dry-run", *args, path=bin_dir))
    result = launch("tpu_vm.sh", *args, path=bin_dir)
    assert result.returncode == 0, result.stderr
    assert recorded_calls(calls) == expected

    calls.unlink()
    failed = launch("tpu_vm.sh", *args, path=bin_dir, extra_env={"FAIL_ON": "ssl_jax.train"})
    assert failed.returncode != 0
    ran = recorded_calls(calls)
    assert ran == expected[:-2] + [expected[-1]], "evaluate ran after a failed train, or no delete"


def test_tpu_vm_workdir_must_be_on_gcs_for_a_multi_host_slice(fake_bin):
    bin_dir, _ = fake_bin
    common = ("--dry-run", "--name", "v", "--zone", "z", "--config", CONFIG, "--skip-setup",
              "--workdir", "/home/me/run")
    refused = launch("tpu_vm.sh", *common, "--accelerator-type", "v5litepod-16", path=bin_dir)
    assert refused.returncode != 0 and "--workdir" in refused.stderr
    assert "gs://" in refused.stderr and "+ " not in refused.stdout
    single_host = launch("tpu_vm.sh", *common, "--accelerator-type", "v4-8", path=bin_dir)
    assert single_host.returncode == 0 and "warning:" in single_host.stderr


def test_gpu_local_dry_run_starts_n_processes_per_job_with_one_coordinator(fake_bin, tmp_path):
    bin_dir, calls = fake_bin
    result = launch("gpu_multiprocess.sh", "--dry-run", "--local", "--num-processes", "3",
                    "--gpus-per-process", "2", "--port", "23456", "--workdir", str(tmp_path),
                    "--config", CONFIG, "--", TRICKY, path=bin_dir)
    cmds = printed(result)
    assert recorded_calls(calls) == []
    assert cmds[0] == ["mkdir", "-p", str(tmp_path / "logs")]
    assert cmds[4] == ["wait"] and cmds[8] == ["wait"] and len(cmds) == 9
    for job, procs in (("train", cmds[1:4]), ("evaluate", cmds[5:8])):
        envs = [env_of(c) for c in procs]
        assert [e["SSL_JAX_PROCESS_ID"] for e in envs] == ["0", "1", "2"]
        assert {e["SSL_JAX_COORDINATOR"] for e in envs} == {"127.0.0.1:23456"}
        assert {e["SSL_JAX_NUM_PROCESSES"] for e in envs} == {"3"}
        assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3", "4,5"]
        for i, cmd in enumerate(procs):
            assert cmd[-4:] == [">", str(tmp_path / "logs" / f"{job}_process_{i}.log"), "2>&1",
                                "&"]
    assert after(cmds[1], "python3")[:-4] == [
        "python3", "-m", "ssl_jax.train", "--config", CONFIG, "--workdir", str(tmp_path), TRICKY]
    assert after(cmds[5], "python3")[:-4] == [
        "python3", "-m", "ssl_jax.evaluate", "--workdir", str(tmp_path)]


def test_gpu_under_slurm_takes_rank_count_and_coordinator_from_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "scontrol", f"""#!/usr/bin/env bash
echo "$*" > {shlex.quote(str(tmp_path / 'scontrol_args'))}
printf 'gpu-node07\\ngpu-node08\\n'
""")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_NODEID": "1", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "gpu-node[07-08]"}
    args = ("--dry-run", "--workdir", "/shared/run", "--config", CONFIG)
    train, evaluate = printed(launch("gpu_multiprocess.sh", *args, "--gpus-per-process", "4",
                                     path=bin_dir, extra_env=slurm))
    assert (tmp_path / "scontrol_args").read_text().split() == [
        "show", "hostnames", "gpu-node[07-08]"]
    for cmd in (train, evaluate):
        assert env_of(cmd) == {"CUDA_VISIBLE_DEVICES": "4,5,6,7",
                               "SSL_JAX_COORDINATOR": "gpu-node07:12345",
                               "SSL_JAX_NUM_PROCESSES": "8", "SSL_JAX_PROCESS_ID": "5"}
    assert after(train, "python3")[2] == "ssl_jax.train"
    assert after(evaluate, "python3")[2] == "ssl_jax.evaluate"
    # Flags win over SLURM's variables.
    [train] = printed(launch("gpu_multiprocess.sh", *args, "--jobs", "train", "--process-id", "0",
                             "--coordinator", "head:999", path=bin_dir, extra_env=slurm))
    assert env_of(train) == {"SSL_JAX_COORDINATOR": "head:999", "SSL_JAX_NUM_PROCESSES": "8",
                             "SSL_JAX_PROCESS_ID": "0"}


def test_gpu_one_process_per_invocation_on_several_hosts(fake_bin):
    bin_dir, calls = fake_bin
    train, evaluate = printed(launch(
        "gpu_multiprocess.sh", "--dry-run", "--num-processes", "2", "--process-id", "1",
        "--coordinator", "10.0.0.1:1234", "--workdir", "/nfs/run", "--config", CONFIG,
        "--python", "python", "--", TRICKY, path=bin_dir))
    assert recorded_calls(calls) == []
    assert train == ["env", "SSL_JAX_COORDINATOR=10.0.0.1:1234", "SSL_JAX_NUM_PROCESSES=2",
                     "SSL_JAX_PROCESS_ID=1", "python", "-m", "ssl_jax.train", "--config", CONFIG,
                     "--workdir", "/nfs/run", TRICKY]
    assert evaluate[:4] == train[:4] and evaluate[4:] == [
        "python", "-m", "ssl_jax.evaluate", "--workdir", "/nfs/run"]


def test_gpu_local_waits_for_all_and_fails_when_one_process_fails(tmp_path):
    fake_python = tmp_path / "fake_python"
    _write_exe(fake_python, """#!/usr/bin/env bash
echo "process $SSL_JAX_PROCESS_ID of $SSL_JAX_NUM_PROCESSES at $SSL_JAX_COORDINATOR: $*"
if [[ $* == *crash* ]]; then
  if [[ $SSL_JAX_PROCESS_ID == 1 ]]; then echo "process 1 crashed"; exit 3; fi
  exec sleep 60  # a peer waiting for the crashed process: the launcher must stop it
fi
""")
    common = ("--local", "--num-processes", "3", "--config", CONFIG, "--python", str(fake_python))
    ok = launch("gpu_multiprocess.sh", *common, "--workdir", str(tmp_path / "ok"))
    assert ok.returncode == 0, ok.stderr
    for job in ("train", "evaluate"):
        for i in range(3):
            log = (tmp_path / "ok" / "logs" / f"{job}_process_{i}.log").read_text()
            assert log.startswith(f"process {i} of 3 at 127.0.0.1:12345: -m ssl_jax.{job}")

    start = time.monotonic()
    bad = launch("gpu_multiprocess.sh", *common, "--workdir", str(tmp_path / "bad"), "--", "crash")
    assert time.monotonic() - start < 30, "the other processes were not stopped"
    assert bad.returncode != 0
    assert "train process 1 exited with status 3" in bad.stderr
    assert "process 1 crashed" in bad.stderr
    assert not (tmp_path / "bad" / "logs" / "evaluate_process_0.log").exists()


def test_local_dry_run_forces_cpu_devices_and_runs_train_then_evaluate(fake_bin):
    bin_dir, calls = fake_bin
    train, evaluate = printed(launch(
        "local.sh", "--dry-run", "--devices", "4", "--config", CONFIG, "--workdir", "/tmp/r",
        "--eval-arg", "--config.eval.knn_k=5", "--", TRICKY, path=bin_dir,
        extra_env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}))
    assert recorded_calls(calls) == []
    for cmd in (train, evaluate):
        assert env_of(cmd) == {"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                               "JAX_PLATFORMS": "cpu"}
    assert after(train, "python3") == ["python3", "-m", "ssl_jax.train", "--config", CONFIG,
                                       "--workdir", "/tmp/r", TRICKY]
    assert after(evaluate, "python3") == ["python3", "-m", "ssl_jax.evaluate", "--workdir",
                                          "/tmp/r", "--config.eval.knn_k=5"]
    [finetune] = printed(launch("local.sh", "--dry-run", "--workdir", "/tmp/r", "--jobs",
                                "finetune", path=bin_dir))
    assert finetune == ["python3", "-m", "ssl_jax.finetune", "--workdir", "/tmp/r"]


def test_local_malloc_preloads_jemalloc_then_tcmalloc_and_refuses_a_missing_one(fake_bin,
                                                                                tmp_path):
    bin_dir, calls = fake_bin
    libs = tmp_path / "lib"
    libs.mkdir()
    (libs / "libtcmalloc_minimal.so.4").write_bytes(b"")
    args = ("local.sh", "--dry-run", "--workdir", "/tmp/r", "--jobs", "evaluate")

    def env_with(*extra):
        result = launch(*args, *extra, path=bin_dir, extra_env={
            "SSL_JAX_MALLOC_LIB_DIRS": f"{tmp_path / 'none'}:{libs}", "LD_PRELOAD": ""})
        if result.returncode:
            return result, None
        cmd = printed(result)[0]
        return result, env_of(cmd) if cmd[0] == "env" else {}

    result, env = env_with()  # auto: tcmalloc is all there is
    assert env == {"LD_PRELOAD": f"{libs}/libtcmalloc_minimal.so.4"}, result.stdout
    (libs / "libjemalloc.so.2").write_bytes(b"")
    _, env = env_with()  # auto prefers jemalloc, with its configuration
    assert env == {"LD_PRELOAD": f"{libs}/libjemalloc.so.2",
                   "MALLOC_CONF": "oversize_threshold:0,background_thread:true"}
    _, env = env_with("--malloc", "tcmalloc")
    assert env == {"LD_PRELOAD": f"{libs}/libtcmalloc_minimal.so.4"}
    result, env = env_with("--malloc=system")
    assert result.returncode == 0 and env == {}
    (libs / "libtcmalloc_minimal.so.4").unlink()
    refused, _ = env_with("--malloc", "tcmalloc")
    assert refused.returncode == 2 and "libtcmalloc-minimal4" in refused.stderr
    unknown, _ = env_with("--malloc", "glibc")
    assert unknown.returncode == 2
    assert "choose from auto, jemalloc, tcmalloc, system" in unknown.stderr
    assert recorded_calls(calls) == []
    # with none installed, auto warns once and runs on the system allocator
    warned = launch(*args, path=bin_dir)
    assert printed(warned)[0][0] == "python3"
    assert "no jemalloc/tcmalloc found" in warned.stderr


@pytest.mark.parametrize("script,args,named", [
    ("local.sh", ["--workdir", "w", "--config", "c", "--bogus"], "--bogus"),
    ("local.sh", ["--config", "c"], "--workdir"),
    ("local.sh", ["--workdir", "w"], "--config"),
    ("local.sh", ["--workdir", "w", "--config", "c", "--devices", "two"], "--devices"),
    ("local.sh", ["--workdir", "w", "--jobs", "train,probe", "--config", "c"], "probe"),
    ("local.sh", ["--workdir", "w", "--config"], "--config"),
    ("gpu_multiprocess.sh", ["--workdir", "w", "--config", "c", "--nproc", "2"], "--nproc"),
    ("gpu_multiprocess.sh", ["--workdir", "w", "--config", "c", "--process-id", "0"],
     "--num-processes"),
    ("gpu_multiprocess.sh", ["--workdir", "w", "--config", "c", "--num-processes", "2"],
     "--process-id"),
    ("gpu_multiprocess.sh", ["--workdir", "w", "--config", "c", "--local"], "--num-processes"),
    ("gpu_multiprocess.sh", ["--workdir", "w", "--config", "c", "--num-processes", "2",
                             "--process-id", "2"], "--process-id"),
    ("tpu_vm.sh", ["--name", "n", "--zone", "z", "--workdir", "gs://b", "--config", "c",
                   "--worker", "all"], "--worker"),
    ("tpu_vm.sh", ["--zone", "z", "--workdir", "gs://b", "--config", "c"], "--name"),
    ("tpu_vm.sh", ["--name", "n", "--workdir", "gs://b", "--config", "c"], "--zone"),
    ("tpu_vm.sh", ["--name", "n", "--zone", "z", "--config", "c"], "--workdir"),
    ("tpu_vm.sh", ["--name", "n", "--zone", "z", "--workdir", "gs://b", "--config", "c",
                   "--create", "--version", "rt"], "--accelerator-type"),
    ("tpu_vm.sh", ["--name", "n", "--zone", "z", "--workdir", "gs://b", "--config", "c",
                   "--create", "--accelerator-type", "v4-8"], "--version"),
    ("tpu_vm.sh", ["--name", "n", "--zone", "z", "--workdir", "/local", "--config", "c",
                   "--delete-after"], "--delete-after"),
])
def test_bad_input_is_an_error_naming_the_option(fake_bin, script, args, named):
    bin_dir, calls = fake_bin
    result = launch(script, *args, path=bin_dir)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and named in result.stderr, result.stderr
    assert result.stdout == "" and recorded_calls(calls) == []


def test_local_sh_trains_and_evaluates_the_smoke_config(tmp_path):
    """A real run: launch/local.sh on the runlocal preset (6 steps) with 2 forced CPU devices."""
    workdir = tmp_path / "run"
    result = launch("local.sh", "--config", CONFIG, "--workdir", str(workdir), "--devices", "2",
                    "--python", sys.executable, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == 6
    results = json.loads((workdir / "eval.json").read_text())
    assert results["step_6"]["step"] == 6
    assert results["step_6"]["ssl"]["linear_top1"] > 0.2  # chance: 0.1; ~0.5 measured
    assert results["step_6"]["random_init"]["num_test"] == 128

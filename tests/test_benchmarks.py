"""The throughput harness and the FLOP counting behind the trainer's 'mfu' metric."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import throughput
from ssl_jax import flops


def test_flops_of_a_matmul_are_2mnk():
    m, n, k = 64, 48, 80
    step = flops.CountedStep(jax.jit(lambda a, b: a @ b))
    out = step(jnp.ones((m, k)), jnp.ones((k, n)))
    assert out.shape == (m, n)
    assert step.flops == 2 * m * n * k
    compiled = step.compiled
    assert compiled.cost_analysis()["flops"] == step.flops  # the count of the executable held
    again = step(jnp.full((m, k), 2.0), jnp.ones((k, n)))
    assert step.compiled is compiled  # the compiled executable is reused, not recompiled
    np.testing.assert_array_equal(out, np.full((m, n), k))
    np.testing.assert_array_equal(again, np.full((m, n), 2 * k))


def test_measured_peak_and_mfu():
    peak = flops.matmul_peak_flops(256, repeats=2)
    assert math.isfinite(peak) and peak > 0
    assert flops.mfu(2e9, 0.5, 4e9) == pytest.approx(0.25)
    assert flops.mfu_metric(math.nan, 1.0, peak) == {}


def test_harness_reports_positive_finite_figures():
    config = throughput.load_config("configs/mae.py:data=digits,runlocal",
                                    {"batch_size": 8, "model.depth": 1})
    result = throughput.measure(config, steps=2, warmup=0, rounds=1, peak_size=256)
    for key in ("compile_s", "step_ms", "images_per_sec", "gflops_per_image",
                "achieved_gflops_per_sec", "peak_gflops_per_sec", "mfu"):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    assert result["steps_timed"] == 2
    assert json.loads(throughput.report(config, result).splitlines()[-1])["method"] == "mae"


def test_trainer_logs_mfu(trained_run):
    _, workdir = trained_run
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(isinstance(r["mfu"], float) and r["mfu"] > 0 for r in rows)


def test_allocator_is_read_from_the_mapped_libraries(tmp_path):
    from ssl_jax import allocator

    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
                    "7f02-7f03 r-xp 0 08:01 2 [heap]\n")
    assert allocator.active(str(maps)) == "system"
    assert "jemalloc" in (allocator.hint("cpu", "system") or "")
    with maps.open("a") as f:
        f.write("7f04-7f05 r-xp 0 08:01 3 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert allocator.active(str(maps)) == "jemalloc"
    assert allocator.hint("cpu", "jemalloc") is None and allocator.hint("gpu", "system") is None
    assert allocator.active(str(tmp_path / "missing")) == "system"


def _simclr_step_temporaries() -> int:
    """XLA's temporary bytes of the compiled SimCLR step (ResNet-18 width 0.25, CIFAR stem, 16
    px, batch 64: 128 views)."""
    config = throughput.load_config("configs/simclr.py:data=digits", {"batch_size": 64})
    bench = throughput.StepBench(config)
    bench.compile()
    return bench.step.compiled.memory_analysis().temp_size_in_bytes


def test_resnet_step_temporaries_are_pinned(monkeypatch):
    """The ResNet step's memory (issue 20): with the conv weight gradient over chunks of the
    batch the temporaries stay under a pinned bound, 1.3x the 14.6 MiB measured here (2026-12-04),
    which the unchunked gradient (all patches at once: 27.0 MiB) exceeds."""
    from ssl_jax.models import layers

    bound = 19 * 2**20
    monkeypatch.setattr(layers, "PATCH_CHUNK_BYTES", 2**20)  # 1 MiB: the stem's patches chunk
    chunked = _simclr_step_temporaries()
    monkeypatch.setattr(layers, "PATCH_CHUNK_BYTES", 2**40)
    whole = _simclr_step_temporaries()
    assert chunked <= bound < whole, (chunked, whole)


def test_method_table_compresses_each_preset_schedule_to_the_budget():
    from benchmarks import method_table

    args = method_table.parse_args(["--steps", "1950", "--batch_size", "256", "--out", "/tmp/x"])
    budget_epochs = 1950 * 256 / 50000
    simclr = method_table.schedule_overrides(args, "simclr")  # preset: 10 of 1000 epochs warm-up
    assert simclr == [f"--config.optim.warmup_epochs={round(10.0 * budget_epochs / 1000, 6)}"]
    dino = dict(item.split("=") for item in method_table.schedule_overrides(args, "dino"))
    assert float(dino["--config.dino.warmup_teacher_temp_epochs"]) == pytest.approx(
        30.0 * budget_epochs / 200)  # 30 of the preset's 200 epochs: the same share of the budget
    assert not any(k.startswith(("--config.eval.", "--config.num_epochs")) for k in dino)
    assert method_table.schedule_overrides(args, "moco_v2") == []  # no warm-up stays none
    cmd = method_table.train_command(args, "moco_v2", "/tmp/x/moco_v2")
    assert "--config.total_steps=1950" in cmd and "--config.batch_size=256" in cmd


def test_method_table_reports_results_and_failures(tmp_path):
    from benchmarks import method_table

    run = tmp_path / "rotation"
    run.mkdir()
    scores = {"linear_top1": 0.5, "knn_top1": 0.4}
    (run / "eval.json").write_text(json.dumps({"latest": {
        "step": 10, "ssl": scores, "random_init": {"linear_top1": 0.3, "knn_top1": 0.2}}}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"step": 5, "loss": 2.0, "images_per_sec": 1.0},  # the first interval: compilation
        {"step": 10, "loss": 1.5, "images_per_sec": 100.0})))
    row = method_table.summarize("rotation", run, "ok")
    assert row["linear"] == 0.5 and row["random_knn"] == 0.2 and row["loss"] == 1.5
    assert row["images_per_sec"] == 100.0
    args = method_table.parse_args(["--steps", "10", "--out", str(tmp_path)])
    text = method_table.table([{"method": "jigsaw", "status": "failed (exit 1, log)"}, row], args)
    lines = text.splitlines()
    assert lines[4].startswith("| rotation | 10 | 50.00 | 40.00 | 30.00 / 20.00 | 1.5 | 100 |")
    assert lines[5] == "| jigsaw | | | | | | | failed (exit 1, log) |"
    with pytest.raises(SystemExit):
        method_table.parse_args(["--steps", "10", "--out", "o", "--methods", "nosuch"])


def test_method_table_sigterm_stops_trainings_and_writes_the_table(tmp_path, monkeypatch):
    """A ``timeout`` around the script: the running training gets SIGTERM (and saves), nothing
    new starts, the table of what finished is written and the exit code is 143."""
    import signal
    import threading

    from benchmarks import method_table

    marker = tmp_path / "trainer_got_sigterm"
    trainer = [sys.executable, "-c", (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').close(), "
        "sys.exit(75)))\ntime.sleep(60)")]
    monkeypatch.setattr(method_table, "train_command", lambda args, m, w: trainer)
    monkeypatch.setattr(method_table, "INTERRUPT", threading.Event())
    threading.Timer(2.0, lambda: signal.raise_signal(signal.SIGTERM)).start()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_info:
            method_table.main(["--steps", "10", "--out", str(tmp_path), "--methods",
                               "rotation,jigsaw"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 143 and marker.exists()
    table = (tmp_path / "table.md").read_text()
    assert "| rotation | | | | | | | interrupted (SIGTERM); its checkpoint was saved |" in table
    assert "| jigsaw | | | | | | | not started (interrupted) |" in table


def test_conv_layers_report_weights_each_layer_by_its_count():
    """benchmarks/conv_layers.py: ResNet-18's 20 convolutions, FLOPs by the formula, and totals
    that weight each layer's time by how often the network has it."""
    from benchmarks import conv_layers

    assert sum(layer[6] for layer in conv_layers.LAYERS) == 20  # 1 stem + 16 + 3 projections
    flops = conv_layers.gflop(2)
    assert flops["s1"] == pytest.approx(2e-9 * 2 * 32 * 32 * 64 * 64 * 9)
    assert flops["s2_proj"] == pytest.approx(2e-9 * 2 * 16 * 16 * 64 * 128)
    jax_round = {name: {op: 1.0 for op in conv_layers.OPS} for name, *_ in conv_layers.LAYERS}
    torch_round = {name: {op: 2.0 for op in conv_layers.OPS} for name, *_ in conv_layers.LAYERS}
    text = conv_layers.report([jax_round], [torch_round], 2)
    assert "| **total** | | 20 / 40 (2.00x) | 20 / 40 (2.00x) | 20 / 40 (2.00x) |" in text
    assert "JAX 60 ms, torch 120 ms, ratio 2.00x" in text


def test_peak_rss_is_this_process_high_water_mark():
    # In a fresh process: a pytest worker's own high-water mark is set by earlier tests.
    code = (
        "import numpy as np\n"
        "from benchmarks.memory import peak_rss_mb\n"
        "before = peak_rss_mb()\n"
        "block = np.ones(300 * 2**20 // 8)\n"  # 300 MiB, every page written
        "after = peak_rss_mb()\n"
        "del block\n"
        "print(before, after, peak_rss_mb())\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         check=True)
    before, after, freed = map(float, out.stdout.split())
    assert before > 10 and after - before > 250
    # A high-water mark stays up when the block is freed (within the kernel's lazily summed
    # per-thread RSS counters: tens of kB).
    assert freed > after - 16


def test_batch_sweep_table_has_one_line_per_batch():
    from benchmarks.batch_sweep import table

    row = {"batch": 256, "jax_s": 12.5, "torch_s": 6.25, "ratio_vs_torch_eager": 0.5,
           "jax_images_per_s_per_core": 10.24, "torch_images_per_s_per_core": 20.48,
           "jax_temp_gib": 3.59, "jax_peak_rss_gb": 5.26, "torch_peak_rss_gb": 3.0}
    lines = table([row, {**row, "batch": 512}]).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 256 |") and lines[3].startswith("| 512 |")
    assert "**0.50x**" in lines[2] and "3.59 GiB" in lines[2] and "3.00 GB |" in lines[2]


@pytest.mark.parametrize("method", ["ibot", "simmim"])
def test_dump_views_writes_the_runs_crops_reproducibly_and_keeps_an_existing_file(tmp_path,
                                                                                   method):
    """benchmarks/dump_views.py: uint8 crops of the run's sizes and counts (iBOT's multi-crop,
    SimMIM's one view), one batch a step, the same file for the same seed, different crops from
    step to step, and no overwrite."""
    import importlib

    from PIL import Image

    from ssl_jax import config as config_lib

    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            pixels = np.random.default_rng(i + 3 * (c == "b")).integers(0, 256, (32, 32, 3))
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "train" / c / f"{i}.png")
    config = importlib.import_module(f"configs.{method}").get_config("data=cifar10,runlocal")
    config.unlock()
    config.update(batch_size=4, total_steps=3)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(config_lib.to_json(config))
    cmd = [sys.executable, "-m", "benchmarks.dump_views", "--run", str(run),
           "--data_root", str(tmp_path)]
    for out in ("v1.npz", "v2.npz"):
        subprocess.run(cmd + ["--out", str(tmp_path / out)], check=True, capture_output=True)
    one, two = np.load(tmp_path / "v1.npz"), np.load(tmp_path / "v2.npz")
    g = config.aug.view1.size
    if method == "ibot":
        s, n = config.aug.local.size, config.aug.num_local_crops
        assert one["globals"].shape == (3, 4, 2, g, g, 3) and one["globals"].dtype == np.uint8
        assert one["locals"].shape == (3, 4, n, s, s, 3)
    else:
        assert one["globals"].shape == (3, 4, 1, g, g, 3) and one["globals"].dtype == np.uint8
        assert "locals" not in one
    np.testing.assert_array_equal(one["globals"], two["globals"])
    assert not np.array_equal(one["globals"][0], one["globals"][1])
    before = (tmp_path / "v1.npz").read_bytes()
    again = subprocess.run(cmd + ["--out", str(tmp_path / "v1.npz")], capture_output=True,
                           text=True)
    assert again.returncode != 0 and "exists" in again.stderr
    assert (tmp_path / "v1.npz").read_bytes() == before

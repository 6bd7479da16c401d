"""The input-pipeline benchmark (benchmarks/pipeline.py): its figures and its last line."""

import math
import subprocess
import sys

import jax
import pytest

from benchmarks import pipeline as bench
from benchmarks import throughput
from ssl_jax import methods, parallel


def test_reports_positive_finite_figures_and_a_parsable_last_line():
    config = throughput.load_config("configs/mae.py:data=digits,runlocal",
                                    {"batch_size": 8, "model.depth": 1})
    result = bench.measure(config, images=16, workers=0, warmup_batches=0, steps=1, warmup=0,
                           rounds=1, aug_calls=2)
    for part in ("in_process", "with_workers", "device", "summary"):
        for key, value in result[part].items():
            assert math.isfinite(value) and value >= 0, (part, key, value)
    last = bench.report(config, result).splitlines()[-1]
    fields = dict(item.split("=", 1) for item in last.split())
    assert fields.pop("method") == "mae" and fields.pop("workers") == "0"
    for key in ("host_ms_per_image", "host_images_per_sec_per_core", "aug_ms_per_batch",
                "aug_fraction_of_step", "pipeline_over_step"):
        assert math.isfinite(float(fields[key])) and float(fields[key]) > 0, (key, fields[key])


@pytest.mark.parametrize("spec, views", [("simclr", (16, 16, 16, 3)),
                                         ("dino", ((8, 2, 16, 16, 3), (8, 2, 8, 8, 3))),
                                         ("mae", (8, 16, 16, 3))])
def test_augmentation_is_the_one_the_method_calls(spec, views):
    config = throughput.load_config(f"configs/{spec}.py:data=digits,runlocal", {"batch_size": 8})
    if spec == "dino":
        with config.unlocked():
            config.aug.num_local_crops, config.aug.local.size = 2, 8
    method = methods.create(config, parallel.make_mesh(), total_steps=10, steps_per_epoch=5)
    images = jax.ShapeDtypeStruct((8, 16, 16, 3), jax.numpy.uint8)
    out = jax.eval_shape(method.augment, jax.random.key(0), images)
    shapes = jax.tree_util.tree_map(lambda x: x.shape, out)
    assert shapes == views


def test_cpu_seconds_count_live_and_ended_children():
    before = bench.cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\ntime.sleep(30)"])
    try:
        deadline = bench.time.perf_counter() + 20
        while bench._live_descendants_cpu_s() < 0.25 and bench.time.perf_counter() < deadline:
            bench.time.sleep(0.05)
        assert bench.cpu_seconds() - before >= 0.25  # a live child's CPU, from /proc
    finally:
        child.kill()
        child.wait()
    assert bench.cpu_seconds() - before >= 0.25  # an ended child's, from getrusage

r"""Can the input pipeline keep up with the train step? Host and device cost of a config's data.

    python -m benchmarks.pipeline --config configs/simclr.py:data=digits
    python -m benchmarks.pipeline --config configs/simclr.py:data=cifar10 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10 --batch_size=128  # 512: ~22 GB on CPU
    python -m benchmarks.pipeline --config configs/mae.py:data=cifar10 --batch_size=256 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10 --workers=4   # any --config.KEY=VALUE

What is measured, for the config's global batch (``--batch_size`` overrides it):

1. Host: ``ssl_jax.data.pipeline.train_loader`` built as the trainer builds it (read, decode,
   resize, batch: the host does no augmentation), iterated for ``--images`` images after
   ``--warmup_batches`` untimed batches and as many as its buffers hold (so that batches read
   ahead during start-up, e.g. by a worker that started first, are not counted as fast ones).
   First in-process (``num_workers=0``; Grain's read threads still decode in parallel): the
   process's CPU time is then all the pipeline's, giving CPU ms per image
   (``host_ms_per_image``) and images per CPU-second (``host_images_per_sec_per_core``). Then
   with the config's ``num_workers`` (``--workers`` overrides), the worker processes' CPU read
   from /proc while they live (``getrusage(RUSAGE_CHILDREN)`` counts only ended ones): the
   images/s the trainer would get (``pipeline_images_per_sec``).
2. Device: the augmentation the method's loss calls (SimCLR's two views, DINO's multi-crop,
   BEiT's paired views, MAE's and the dVAE's one view; normalisation included, masks not) jitted
   alone on the uint8 batch of ``benchmarks.throughput.StepBench``, and that whole train step
   (augmentation included) on the same batch: ``--rounds`` rounds of ``--steps`` steps then
   ``--aug_calls`` augmentation calls, each waited for; medians. ``aug_fraction_of_step`` is
   augmentation run alone over the step (inside the step XLA may fuse it with the encoder).
3. ``pipeline_over_step``: the pipeline's images/s (config's workers) over the step's; above 1
   the pipeline is not the bottleneck. Where host and step share the same CPU cores (a CPU-only
   machine) this compares capacities: in training they also slow each other down.

The last line is machine-readable: ``method=M host_ms_per_image=... pipeline_over_step=...``.
"""

from __future__ import annotations

import gc
import math
import os
import resource
import statistics
import sys
import time
from typing import Any

import jax
import ml_collections

from benchmarks import throughput
from ssl_jax import allocator
from ssl_jax.data import pipeline


def _live_descendants_cpu_s() -> float:
    """CPU seconds (user + system) of this process's live descendants, from /proc (0 without)."""
    parent_of, cpu_of = {}, {}
    for entry in (os.listdir("/proc") if os.path.isdir("/proc") else ()):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            parent_of[int(entry)] = int(fields[1])
            cpu_of[int(entry)] = int(fields[11]) + int(fields[12])  # utime, stime (ticks)
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parent_of.items() if ppid in frontier} - mine
        mine |= frontier
    return sum(cpu_of[pid] for pid in mine) / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads), its ended children and its live ones."""
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ended.ru_utime + ended.ru_stime + _live_descendants_cpu_s()


def measure_host(config: ml_collections.ConfigDict, workers: int, images: int,
                 warmup_batches: int = 1) -> dict[str, float]:
    """Wall and CPU time of the trainer's loader with ``workers`` processes (module docstring)."""
    data = config.data.copy_and_resolve_references()
    with data.unlocked():
        data.num_workers = workers
    loader = pipeline.train_loader(
        data, global_batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    batches = max(1, math.ceil(images / config.batch_size))
    iterator = iter(loader)
    # Drain what was read ahead meanwhile: each worker's buffer, or the read threads' 2 batches.
    buffered = workers * (data.get("prefetch", 2) + 1) if workers else 2
    for _ in range(warmup_batches + buffered):
        next(iterator)
    wall, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        batch = next(iterator)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    assert batch["image"].shape[0] == config.batch_size // jax.process_count()
    del iterator, loader  # ends the workers
    gc.collect()
    n = batches * config.batch_size // jax.process_count()
    return {"workers": workers, "images": n, "images_per_sec": n / wall,
            "cpu_ms_per_image": 1e3 * cpu / n, "images_per_cpu_sec": n / cpu}


def measure_device(config: ml_collections.ConfigDict, steps: int = 5, warmup: int = 1,
                   rounds: int = 3, aug_calls: int = 5) -> dict[str, float]:
    """Median seconds of the method's augmentation alone and of the whole train step."""
    bench = throughput.StepBench(config)
    augment_fn = jax.jit(bench.method.augment)
    images, key = bench.batch["image"], jax.random.key(1)
    start = time.perf_counter()
    jax.block_until_ready(augment_fn(key, images))
    aug_compile_s = time.perf_counter() - start
    bench.compile()
    bench.run(warmup)
    step_times, aug_times = [], []
    for r in range(rounds):
        step_times += bench.run(steps)
        for i in range(aug_calls):
            call_key = jax.block_until_ready(jax.random.fold_in(key, r * aug_calls + i))
            start = time.perf_counter()
            jax.block_until_ready(augment_fn(call_key, images))
            aug_times.append(time.perf_counter() - start)
    step_s, aug_s = statistics.median(step_times), statistics.median(aug_times)
    return {"aug_compile_s": aug_compile_s, "step_compile_s": bench.compile_s,
            "aug_ms_per_batch": 1e3 * aug_s, "aug_images_per_sec": config.batch_size / aug_s,
            "step_ms": 1e3 * step_s, "step_images_per_sec": config.batch_size / step_s,
            "aug_fraction_of_step": aug_s / step_s}


def measure(config: ml_collections.ConfigDict, images: int = 2000, workers: int = -1,
            warmup_batches: int = 1, steps: int = 5, warmup: int = 1, rounds: int = 3,
            aug_calls: int = 5) -> dict[str, Any]:
    """All figures of the module docstring; ``workers < 0``: the config's ``num_workers``."""
    workers = config.data.num_workers if workers < 0 else workers
    in_process = measure_host(config, 0, images, warmup_batches)
    with_workers = (measure_host(config, workers, images, warmup_batches) if workers
                    else in_process)
    device = measure_device(config, steps, warmup, rounds, aug_calls)
    return {
        "in_process": in_process, "with_workers": with_workers, "device": device,
        "summary": {
            "batch": config.batch_size, "workers": workers,
            "host_ms_per_image": in_process["cpu_ms_per_image"],
            "host_images_per_sec_per_core": in_process["images_per_cpu_sec"],
            "pipeline_images_per_sec": with_workers["images_per_sec"],
            "aug_ms_per_batch": device["aug_ms_per_batch"],
            "step_images_per_sec": device["step_images_per_sec"],
            "aug_fraction_of_step": device["aug_fraction_of_step"],
            "pipeline_over_step": with_workers["images_per_sec"] / device["step_images_per_sec"],
        },
    }


def report(config: ml_collections.ConfigDict, result: dict[str, Any]) -> str:
    """Readable lines, a verdict, and last the ``key=value`` line."""
    lines = [f"method={config.method} data={config.data.name} batch={config.batch_size} "
             f"cores={len(os.sched_getaffinity(0))} devices={jax.device_count()} "
             f"({jax.devices()[0].device_kind}) allocator={allocator.active()}"]
    for part in ("in_process", "with_workers", "device"):
        lines.append(f"  {part}: " + " ".join(
            f"{k}={v:.4g}" for k, v in result[part].items()))
    summary = result["summary"]
    ratio = summary["pipeline_over_step"]
    lines.append(
        f"verdict: the pipeline ({summary['workers']} workers) gives "
        f"{summary['pipeline_images_per_sec']:.0f} images/s, the step takes "
        f"{summary['step_images_per_sec']:.0f} images/s: pipeline_over_step={ratio:.2f} ("
        + ("the pipeline keeps up)" if ratio > 1 else "the pipeline is the bottleneck)"))
    lines.append(f"method={config.method} " + " ".join(
        f"{k}={v}" if isinstance(v, int) else f"{k}={v:.4g}" for k, v in summary.items()))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from absl import flags

    args = flags.FLAGS
    config = throughput.flag_config(argv)
    result = measure(config, args.images, args.workers, args.warmup_batches, args.steps,
                     args.warmup, args.rounds, args.aug_calls)
    print(report(config, result))
    sys.stdout.flush()


def define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Training config file (as the trainer's).")
    flags.DEFINE_integer("batch_size", 0, "Global batch (0: the config's).")
    flags.DEFINE_integer("images", 2000, "Images read in each timed pass of the pipeline.")
    flags.DEFINE_integer("workers", -1, "Grain worker processes (-1: config.data.num_workers).")
    flags.DEFINE_integer("warmup_batches", 1, "Untimed batches before each timed pass (besides "
                         "those that drain the read-ahead buffers).")
    flags.DEFINE_integer("steps", 5, "Timed train steps per round.")
    flags.DEFINE_integer("warmup", 1, "Untimed train steps after compilation.")
    flags.DEFINE_integer("rounds", 3, "Rounds of timed steps and augmentation calls.")
    flags.DEFINE_integer("aug_calls", 5, "Timed augmentation calls per round.")
    flags.mark_flag_as_required("config")


if __name__ == "__main__":
    from ssl_jax import cli

    define_flags()
    cli.run(main)

r"""Throughput of the real train step of a config: compile time, step time, images/s, FLOPs, MFU.

    python -m benchmarks.throughput --config configs/mae.py:data=cifar10 --batch_size=64
    python -m benchmarks.throughput --config configs/dino.py:data=cifar10,local_crops=2 \
        --batch_size=64 --steps=20
    python -m benchmarks.throughput --config configs/mae.py:data=cifar10 --model=vit_s4 \
        --config.mae.mask_ratio=0.75           # any --config.KEY=VALUE override, as the trainer

The step is built exactly as ``ssl_jax.train`` builds it (``ssl_jax.step.build_state`` and
``make_train_step``, ``jax.jit`` with the state's shardings, the batch sharded over the mesh,
the state donated) and fed one synthetic uint8 batch that already lies on the devices, so the
figures are those of the step alone: no input pipeline, no host round trip. The method's
on-device augmentation, masking, EMA teacher etc. are part of the step, as in training.

Timing: ``--rounds`` rounds, each of ``--steps`` steps (every step waited for with
``block_until_ready``) followed by one measurement of the device's matmul peak
(``ssl_jax.flops.matmul_peak_flops``), after ``--warmup`` untimed steps; the step time is the
median over all timed steps, the peak the median of the rounds' peaks, so that a shared machine
slows both alike. FLOPs are XLA's cost analysis of the compiled step: the **whole** train step
(forward + backward + optimizer update + augmentation), per device, divided by the per-device
batch for FLOPs per image. ``--model=NAME`` swaps the encoder (keeping the preset's ViT
options such as position embeddings, but not its depth/width overrides).
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from ssl_jax import allocator, flops, methods, parallel, presets
from ssl_jax.step import build_state, make_train_step

SIZE_KEYS = ("dim", "depth", "num_heads")


def load_config(spec: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
    """``configs/X.py[:arg]`` -> its ``get_config(arg)``, with dotted-key ``overrides`` set."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    with config.unlocked():
        config.update_from_flattened_dict(overrides or {})
    return config


def set_model(config: ml_collections.ConfigDict, name: str) -> None:
    """The encoder ``name`` with the preset's other model options (not its size overrides)."""
    with config.unlocked():
        options = {k: v for k, v in config.model.items() if k not in ("name", *SIZE_KEYS)}
        presets.set_model(config, name, **options)


def run_length(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """``(total_steps, steps_per_epoch)`` as the trainer would compute them (from the preset's
    dataset size, so that no data is read)."""
    num_train = presets.DATASETS.get(config.data.name, {}).get("num_train", 50_000)
    steps_per_epoch = max(num_train // config.batch_size, 1)
    return config.total_steps or int(config.num_epochs * steps_per_epoch), steps_per_epoch


def random_tokenizer(config: ml_collections.ConfigDict) -> str:
    """BEiT without ``beit.tokenizer_workdir``: a workdir holding a randomly initialised dVAE of
    the same data preset (the tokenizer's cost, not its tokens, matters here)."""
    from ssl_jax import checkpoint

    dvae_file = __file__.rsplit("/", 2)[0] + "/configs/dvae.py"
    tok_config = load_config(f"{dvae_file}:data={config.data.name}")
    workdir = tempfile.mkdtemp(prefix="bench_tokenizer_")
    checkpoint.check_workdir(workdir, tok_config)
    mesh = parallel.make_mesh()
    method = methods.create(tok_config, mesh)
    setup = build_state(tok_config, mesh, method, 1, 1)
    state = jax.jit(setup.init_state, out_shardings=setup.shardings)(jax.random.key(0))
    import orbax.checkpoint as ocp

    saver = checkpoint.RunCheckpoints(workdir, async_save=False)
    saver.manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    saver.close()
    return workdir


class StepBench:
    """The trainer's jitted step of ``config`` on a synthetic device-resident batch."""

    def __init__(self, config: ml_collections.ConfigDict, donate: bool = True, seed: int = 0):
        if config.method == "beit" and not config.beit.tokenizer_workdir:
            with config.unlocked():
                config.beit.tokenizer_workdir = random_tokenizer(config)
        self.config = config
        self.compute_dtype = config.model.get("dtype", "float32")  # of the MFU's peak
        mesh = parallel.make_mesh(config.mesh.fsdp)
        parallel.check_global_batch(config.batch_size, mesh)
        total_steps, steps_per_epoch = run_length(config)
        self.method = method = methods.create(config, mesh, total_steps=total_steps,
                                              steps_per_epoch=steps_per_epoch)
        setup = build_state(config, mesh, method, total_steps, steps_per_epoch)
        init_rng, step_rng = jax.random.split(jax.random.key(seed))
        self.state = jax.jit(setup.init_state, out_shardings=setup.shardings)(init_rng)
        jitted = jax.jit(
            make_train_step(method, setup.tx, setup.schedule, step_rng, config.on_nonfinite,
                            setup.probe),
            in_shardings=(setup.shardings, parallel.batch_sharding(mesh)),
            out_shardings=(setup.shardings, parallel.replicated(mesh)),
            donate_argnums=(0,) if donate else (),
        )
        self.step = flops.CountedStep(jitted)
        size = config.data.image_size
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8)
        labels = np.zeros((config.batch_size,), np.int32)
        self.batch = parallel.global_batch({"image": images, "label": labels}, mesh)
        self.devices = mesh.size
        self.compile_s = math.nan
        self.cpu_times: list[float] = []

    def compile(self) -> float:
        """Lowers and compiles the step (once); returns the seconds it took."""
        if self.step.compiled is None:
            start = time.perf_counter()
            self.step.compile(self.state, self.batch)
            self.compile_s = time.perf_counter() - start
        return self.compile_s

    @property
    def flops_per_step(self) -> float:
        """XLA's FLOPs of one step of one device (forward + backward + update + augmentation)."""
        return self.step.flops

    def run(self, steps: int) -> list[float]:
        """Seconds of each of ``steps`` steps, each waited for. The process's CPU seconds of
        each step go to :attr:`cpu_times` (steadier than wall time on a loaded machine)."""
        self.compile()
        times = []
        for _ in range(steps):
            start, cpu = time.perf_counter(), time.process_time()
            self.state, metrics = self.step(self.state, self.batch)
            jax.block_until_ready((self.state, metrics))
            times.append(time.perf_counter() - start)
            self.cpu_times.append(time.process_time() - cpu)
        return times


def summarize(bench: StepBench, step_times: list[float], peaks: list[float]) -> dict[str, float]:
    """The harness's figures from the timed steps and the rounds' peak measurements."""
    step_s = statistics.median(step_times)
    peak = statistics.median(peaks) if peaks else math.nan
    per_device_batch = bench.config.batch_size / bench.devices
    achieved = bench.flops_per_step / step_s
    return {
        "compile_s": bench.compile_s,
        "step_ms": 1e3 * step_s,
        "step_ms_min": 1e3 * min(step_times),
        "cpu_ms": 1e3 * statistics.median(bench.cpu_times) if bench.cpu_times else math.nan,
        "images_per_sec": bench.config.batch_size / step_s,
        "gflops_per_image": bench.flops_per_step / per_device_batch / 1e9,
        "achieved_gflops_per_sec": achieved / 1e9,
        "peak_gflops_per_sec": peak / 1e9,
        "mfu": achieved / peak,
        "steps_timed": len(step_times),
    }


def measure(config: ml_collections.ConfigDict, steps: int = 10, warmup: int = 2,
            rounds: int = 3, peak_size: int | None = None, donate: bool = True
            ) -> dict[str, float]:
    """Builds, compiles, warms up and times the step of ``config`` (see the module docstring)."""
    bench = StepBench(config, donate=donate)
    bench.compile()
    bench.run(warmup)
    bench.cpu_times.clear()
    step_times, peaks = [], []
    for _ in range(rounds):
        step_times += bench.run(steps)
        peaks.append(flops.matmul_peak_flops(peak_size, repeats=3,
                                             compute_dtype=bench.compute_dtype))
    return summarize(bench, step_times, peaks)


def report(config: ml_collections.ConfigDict, result: dict[str, float]) -> str:
    model = config.model.to_dict() if "model" in config else {}
    lines = [f"method={config.method} batch={config.batch_size} devices={jax.device_count()} "
             f"({jax.devices()[0].device_kind}) allocator={allocator.active()} "
             f"model={json.dumps(model, default=str)}"]
    lines += [f"  {key:<24} {value:.4g}" for key, value in result.items()]
    lines.append(json.dumps({"method": config.method, **result}))
    return "\n".join(lines)


def flag_config(argv: list[str]) -> ml_collections.ConfigDict:
    """The ``--config`` of an absl entry point with its ``--batch_size`` (0: the config's)."""
    from absl import flags

    if len(argv) > 1:
        raise flags.Error(f"unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    if flags.FLAGS.batch_size:
        with config.unlocked():
            config.batch_size = flags.FLAGS.batch_size
    return config


def main(argv: list[str]) -> None:
    from absl import flags

    args = flags.FLAGS
    config = flag_config(argv)
    if args.model:
        set_model(config, args.model)
    result = measure(config, args.steps, args.warmup, args.rounds, args.peak_size or None,
                     donate=not args.no_donate)
    print(report(config, result))
    sys.stdout.flush()


def define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Training config file (as the trainer's).")
    flags.DEFINE_integer("batch_size", 0, "Global batch (0: the config's).")
    flags.DEFINE_string("model", "", "Encoder name, e.g. vit_s4 (default: the config's).")
    flags.DEFINE_integer("steps", 10, "Timed steps per round.")
    flags.DEFINE_integer("rounds", 3, "Rounds of timed steps, each followed by a peak measure.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
    flags.DEFINE_integer("peak_size", 0, "Side of the peak's matmul (0: 2048 f32 on CPU).")
    flags.DEFINE_bool("no_donate", False, "Do not donate the state (to measure donation).")
    flags.mark_flag_as_required("config")


if __name__ == "__main__":
    from ssl_jax import cli

    define_flags()
    cli.run(main)

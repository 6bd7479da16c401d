r"""Step time and peak memory against the batch size, the project beside torch eager.

    bash ../shared/peers/setup.sh /tmp/peers        # once: torch (CPU), timm, lightly
    python -m benchmarks.batch_sweep --method simclr --batch_sizes 32,64,128,256,512
    python -m benchmarks.batch_sweep --method simclr --features --batch_sizes 256,1024

Each batch size runs in a fresh process of its own (so that its peak resident set is its own):
the project's step (``benchmarks.throughput.StepBench``, the trainer's jitted step) and the same
step in torch eager (``benchmarks/torch_peer.py`` in its own subprocess, eager only), the two
interleaved for ``--rounds`` rounds of ``--steps`` steps after ``--warmup`` steps each. Reported
per batch: the median step of each side, the ratio (torch's median step over the project's,
per round, median over rounds: > 1 means the project is faster), images per second per core,
XLA's temporaries of the compiled step (``memory_analysis().temp_size_in_bytes``) and each
process's peak resident set (``VmHWM``, which includes compilation and the runtime itself).

``--features`` times the evaluation job's feature extraction instead: the run's encoder in eval
mode on a batch of uint8 images (``ssl_jax.evaluate.frozen.FrozenEncoder.embed`` on a randomly
initialised encoder: normalisation, forward, features copied back to the host) against the
backbone's forward under ``torch.inference_mode``. ``--batch_sizes`` is then the extraction
batch (``eval.batch_size``). The methods are ``benchmarks/vs_torch.py``'s; both sides run on the
C library's malloc unless this process is started under another allocator (the torch side drops
it, as in vs_torch). The last line is a JSON list of the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

from benchmarks.memory import peak_rss_mb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


class FeatureBench:
    """The evaluation job's embedding of one batch by a randomly initialised encoder."""

    def __init__(self, config: Any):
        from ssl_jax import parallel
        from ssl_jax.evaluate.features import random_encoder
        from ssl_jax.evaluate.frozen import FrozenEncoder

        mesh = parallel.make_mesh(config.mesh.fsdp)
        method, variables = random_encoder(config, mesh, seed=0)
        self.encoder = FrozenEncoder(method, variables, config, mesh, step=-1)
        size = config.data.image_size
        self.images = np.random.default_rng(0).integers(
            0, 256, (config.eval.batch_size, size, size, 3), dtype=np.uint8)

    def run(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.encoder.embed(self.images)  # a host array: waits for the device
            times.append(time.perf_counter() - start)
        return times


def measure_one(method: str, batch: int, steps: int, rounds: int, warmup: int, features: bool,
                python: str) -> dict[str, Any]:
    """One batch size, both sides, in this process (the JAX side) and a torch subprocess."""
    from benchmarks.throughput import StepBench
    from benchmarks.vs_torch import TorchPeer, method_config, torch_spec

    key = "eval.batch_size" if features else "batch_size"
    config = method_config(method, {key: batch})
    cores = len(os.sched_getaffinity(0))
    temp_bytes = float("nan")  # XLA's temporaries: of the train step only
    if features:
        bench = FeatureBench(config)
        spec = {**torch_spec(config, bench.encoder.method), "batch_size": batch,
                "features": True}
    else:
        bench = StepBench(config)
        bench.compile()
        temp_bytes = bench.step.compiled.memory_analysis().temp_size_in_bytes
        spec = torch_spec(config, bench.method)
    bench.run(warmup)
    peer = TorchPeer(python, {**spec, "warmup": warmup, "threads": cores,
                              "flush_denormal": True, "modes": ["eager"]})
    jax_times, torch_times, ratios = [], [], []
    try:
        for r in range(rounds):
            sides = ("jax", "torch") if r % 2 == 0 else ("torch", "jax")
            this = {s: bench.run(steps) if s == "jax" else peer.run("eager", steps) for s in sides}
            jax_times += this["jax"]
            torch_times += this["torch"]
            ratios.append(statistics.median(this["torch"]) / statistics.median(this["jax"]))
        torch_rss = peer.peak_rss_mb
    finally:
        peer.close()
    jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
    return {"method": method, "mode": "features" if features else "step", "batch": batch,
            "cores": cores, "jax_s": jax_s, "torch_s": torch_s,
            "ratio_vs_torch_eager": statistics.median(ratios),
            "ratio_per_round": [round(x, 3) for x in ratios],
            "jax_images_per_s_per_core": batch / jax_s / cores,
            "torch_images_per_s_per_core": batch / torch_s / cores,
            "jax_temp_gib": temp_bytes / GIB, "jax_peak_rss_gb": peak_rss_mb() / 1024,
            "torch_peak_rss_gb": torch_rss / 1024}


def gib(value: float) -> str:
    return "—" if value != value else f"{value:.2f} GiB"  # NaN: not measured (--features)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| batch | project step | torch eager | torch / project | images/s/core project "
             "| torch | XLA temporaries | peak RSS project | torch |", "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['jax_s']:.3f} s | {r['torch_s']:.3f} s | "
            f"**{r['ratio_vs_torch_eager']:.2f}x** | {r['jax_images_per_s_per_core']:.1f} | "
            f"{r['torch_images_per_s_per_core']:.1f} | {gib(r['jax_temp_gib'])} | "
            f"{r['jax_peak_rss_gb']:.2f} GB | {r['torch_peak_rss_gb']:.2f} GB |")
    return "\n".join(lines)


def main() -> None:
    from benchmarks.vs_torch import METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="simclr", choices=sorted(METHODS))
    parser.add_argument("--batch_sizes", default="32,64,128,256,512")
    parser.add_argument("--features", action="store_true",
                        help="the evaluation job's feature extraction instead of the train step")
    parser.add_argument("--steps", type=int, default=2, help="steps per side per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peers_python", default=os.environ.get(
        "SSL_JAX_PEERS_PYTHON", "/tmp/peers/bin/python"))
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not os.path.exists(args.peers_python):
        sys.exit(f"error: {args.peers_python} not found; build the peers' environment with "
                 "bash ../shared/peers/setup.sh /tmp/peers (or pass --peers_python)")
    if args.one:  # the child: one batch size, one JSON line
        row = measure_one(args.method, args.one, args.steps, args.rounds, args.warmup,
                          args.features, args.peers_python)
        print("ROW " + json.dumps(row), flush=True)
        return
    try:
        batches = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        sys.exit(f"error: --batch_sizes must be integers separated by commas, got "
                 f"{args.batch_sizes!r}")
    rows = []
    for batch in batches:
        argv = [sys.executable, "-m", "benchmarks.batch_sweep", "--one", str(batch)]
        argv += [f"--{k}={getattr(args, k)}" for k in ("method", "steps", "rounds", "warmup",
                                                         "peers_python")]
        argv += ["--features"] * args.features
        out = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        found = [line[4:] for line in out.stdout.splitlines() if line.startswith("ROW ")]
        if out.returncode or not found:
            print(f"batch {batch}: failed (exit {out.returncode}); stopping", file=sys.stderr)
            break
        rows.append(json.loads(found[0]))
        print(table(rows).splitlines()[-1], flush=True)
    print(table(rows))
    print(json.dumps(rows))
    if len(rows) < len(batches):
        sys.exit(1)


if __name__ == "__main__":
    main()

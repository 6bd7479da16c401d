r"""A/B of the train step under different XLA flags or code versions, interleaved.

    python -m benchmarks.compare --config configs/mae.py:data=cifar10 --batch_size=64 \
        --variant base= --variant onednn=--xla_cpu_use_onednn=true \
        [--variant old=@/path/to/another/checkout] [--rounds=5 --steps=3]
    python -m benchmarks.compare --config configs/simclr.py:data=digits \
        --set online_probe.num_classes=10 --variant off= --variant probe= \
        --variant_set probe:online_probe.enabled=true     # a config change as a variant

Each ``--variant NAME=XLA_FLAGS[@CHECKOUT]`` runs in its own persistent process (XLA flags are
read once per process) with ``XLA_FLAGS`` set and, with ``@CHECKOUT``, the project imported from
that directory (e.g. a ``git worktree`` of another commit); ``--variant_set NAME:KEY=JSON``
overrides a config key in that variant only (``--set``: in all). Every process builds the trainer's
step (``benchmarks.throughput.StepBench``) and measures its own matmul peak; then the variants
take turns, ``--steps`` steps each per round, the order rotating, so that a shared machine's
load falls on all of them alike. Reported: median step time, its ratio to the first variant's
(per round, median over rounds; < 1 is faster), and MFU against the variant's own peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker() -> None:
    """The process of one variant: ``spec`` on the first stdin line, then ``{"steps": K}``."""
    sys.path.insert(0, os.getcwd())
    from benchmarks.throughput import StepBench, load_config, set_model
    from ssl_jax import flops

    spec = json.loads(sys.stdin.readline())
    config = load_config(spec["config"], spec["overrides"])
    if spec["model"]:
        set_model(config, spec["model"])
    bench = StepBench(config)
    bench.compile()
    bench.run(spec["warmup"])
    bench.cpu_times.clear()
    print(json.dumps({"compile_s": bench.compile_s, "flops": bench.flops_per_step}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if "steps" in cmd:
            times = bench.run(cmd["steps"])
            cpu = bench.cpu_times[-cmd["steps"]:]
            print(json.dumps({"times": times, "cpu": cpu}), flush=True)
        elif "peak" in cmd:
            peak = flops.matmul_peak_flops(repeats=3, compute_dtype=bench.compute_dtype)
            print(json.dumps({"peak": peak}), flush=True)
        else:
            break


class Variant:
    def __init__(self, text: str, spec: dict):
        self.name, _, rest = text.partition("=")
        flags, _, checkout = rest.partition("@")
        checkout = os.path.abspath(checkout or ROOT)
        env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": checkout}
        spec = {**spec, "config": os.path.join(checkout, spec["config"])}
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.compare", "--worker"],
                                     cwd=checkout, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.flags, self.checkout = flags, checkout
        self.ready = self.ask(spec)
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.peaks: list[float] = []

    def ask(self, message: dict) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"variant {self.name} exited with code {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("{}\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config")
    parser.add_argument("--batch_size", type=int, default=0)
    parser.add_argument("--model", default="")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="config override, value as JSON, e.g. model.depth=12")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS[@DIR]")
    parser.add_argument("--variant_set", action="append", default=[], metavar="NAME:KEY=JSON",
                        help="config override of one variant, e.g. probe:online_probe.enabled=true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        return worker()
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    spec = {"config": args.config, "overrides": overrides, "model": args.model,
            "warmup": args.warmup}
    own: dict[str, dict] = {}
    for item in args.variant_set:
        name, _, setting = item.partition(":")
        key, _, value = setting.partition("=")
        own.setdefault(name, {})[key] = json.loads(value)
    names = {text.partition("=")[0] for text in args.variant}
    if set(own) - names:
        parser.error(f"--variant_set names unknown variants {sorted(set(own) - names)}")
    variants = [Variant(text, {**spec, "overrides": {**overrides,
                                                     **own.get(text.partition("=")[0], {})}})
                for text in args.variant]
    ratios: dict[str, list[float]] = {v.name: [] for v in variants}
    try:
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            medians = {}
            for v in order:
                answer = v.ask({"steps": args.steps})
                times = answer["times"]
                v.times += times
                v.cpu += answer["cpu"]
                medians[v.name] = statistics.median(times)
            for v in variants:
                ratios[v.name].append(medians[v.name] / medians[variants[0].name])
                v.peaks.append(v.ask({"peak": True})["peak"])
    finally:
        for v in variants:
            v.close()
    for v in variants:
        step = statistics.median(v.times)
        row = {"variant": v.name, "flags": v.flags, "checkout": v.checkout,
               "config": own.get(v.name, {}),
               "step_ms": 1e3 * step, "cpu_ms": 1e3 * statistics.median(v.cpu),
               "cpu_ratio_to_first": statistics.median(v.cpu) / statistics.median(variants[0].cpu),
               "ratio_to_first": statistics.median(ratios[v.name]),
               "ratio_per_round": [round(x, 3) for x in ratios[v.name]],
               "gflops_per_step": v.ready["flops"] / 1e9, "compile_s": v.ready["compile_s"],
               "peak_gflops_per_sec": statistics.median(v.peaks) / 1e9,
               "mfu": v.ready["flops"] / step / statistics.median(v.peaks)}
        print(json.dumps(row))


if __name__ == "__main__":
    main()

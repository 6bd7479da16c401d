r"""The project's train step side by side with the same step in PyTorch (eager and torch.compile).

    bash ../shared/peers/setup.sh /tmp/peers        # once: torch (CPU), timm, lightly
    python -m benchmarks.vs_torch --method mae [--quick] [--peers_python /tmp/peers/bin/python]

Methods and sizes (2 CPU cores in mind): ``mae``, ``beit``, ``dino``: the CIFAR-10 presets' ViT
(ViT-Ti width 192, 6 blocks, 3 heads, patch 4, 32-px images), batch 64 (DINO with 2 local crops
of 16 px, as the CIFAR-10 run in docs/benchmarks/simclr_dino.md; ``--local_crops`` changes it;
BEiT with a randomly initialised dVAE tokenizer of the CIFAR-10 preset); ``simclr``: the CIFAR-stem
ResNet-18 (width 1) of the CIFAR-10 preset at batch 32. ``--batch_size`` changes the batch.

The JAX side is ``benchmarks.throughput.StepBench``: the trainer's own jitted step (shardings,
donation) on a device-resident uint8 batch. The torch side (``benchmarks/torch_peer.py``, run by
the peers' Python in a persistent subprocess driven over a pipe) is the same method written with
the peers' libraries: timm's ViT / Beit / ResNet-18 and Blocks, lightly's NTXentLoss, DINOLoss,
projection heads, LARS and momentum update, the MAE and BEiT losses in plain torch; the same
shapes, batch, optimizer kind (LARS / AdamW), gradient clipping, EMA teacher. Both steps include
the method's augmentation of the uint8 batch (the project's step augments on the device inside
the jitted step; the torch step does the same ops as batched tensor ops: crop + flip through
``grid_sample``, colour jitter, grayscale, blur, solarize) and the masking. torch runs with
``torch.set_num_threads(2)`` (both cores, as XLA's CPU thread pool); the two never run at once.
``--threads=1`` pins both processes to one core instead (torch with one thread, XLA's pool on one
core): per-core efficiency, which a loaded machine distorts far less (torch's OpenMP regions wait
for every thread, so on a shared 2-core machine a 2-thread torch step stalls whenever one of its
threads is descheduled). torch flushes denormals to zero, as XLA:CPU does
(``torch.set_flush_denormal(True)``; ``--torch_denormals`` keeps torch's default).
``torch.compile`` wraps the augmentation, forward and loss (its backward is compiled by
AOTAutograd); the optimizer step stays eager in both torch modes. ``--dtype=bfloat16`` runs the
project's step with ``config.model.dtype='bfloat16'`` (bfloat16 compute, float32 parameters) and
torch's forward and loss under ``torch.autocast('cpu', torch.bfloat16)``, the usual way to the
same mixed precision there; the MFU's peak is then the bfloat16 matmul's.

Allocators: the JAX side runs on this process's allocator (run the command as the launch scripts
run the trainer, ``LD_PRELOAD=.../libjemalloc.so.2 MALLOC_CONF=oversize_threshold:0,background_
thread:true``: see ``ssl_jax/allocator.py``); the torch peer runs on the C library's malloc, as
users run torch (its steps are as fast or faster there), unless ``--torch_malloc=inherit`` gives it
the same preload. Both are printed (``allocator_jax``, ``allocator_torch``).

Timing: after compilation and warm-up, ``--rounds`` rounds; in each, JAX, torch eager and
torch.compile run ``--steps`` steps each (the order rotating from round to round), then the
device's matmul peak is measured for the MFU. Ratios are torch's median step time over JAX's
(> 1: the project is faster), computed per round and the median over rounds reported. The last
line is ``method=M ratio_vs_torch_compile=X.XX ratio_vs_torch_eager=Y.YY mfu=Z.ZZ``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

import ml_collections

from benchmarks.throughput import StepBench, load_config, summarize
from ssl_jax import allocator, flops
from ssl_jax.data import augment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {  # config, batch
    "simclr": ("configs/simclr.py:data=cifar10", 32),
    "dino": ("configs/dino.py:data=cifar10,local_crops={local_crops}", 64),
    "mae": ("configs/mae.py:data=cifar10", 64),
    "beit": ("configs/beit.py:data=cifar10", 64),
}
SIDES = ("jax", "eager", "compile")
MALLOC_ENV = ("LD_PRELOAD", "MALLOC_CONF")


def view_spec(view: ml_collections.ConfigDict) -> dict[str, Any]:
    jitter = view.color_jitter > 0 and view.color_jitter_p > 0
    return {"size": view.size, "crop_scale": list(view.crop_scale),
            "crop_ratio": list(view.crop_ratio), "flip": bool(view.flip),
            "jitter": list(augment.jitter_values(view)) if jitter else [0.0] * 4,
            "jitter_p": view.color_jitter_p if jitter else 0.0,
            "grayscale_p": view.grayscale_p, "blur_p": view.blur_p,
            "solarize_p": view.solarize_p}


def method_config(method: str, overrides: dict[str, Any], local_crops: int = 2
                  ) -> ml_collections.ConfigDict:
    """The CIFAR-10 preset of ``method`` (DINO with ``local_crops`` local crops; the preset's
    own is 6), with dotted-key ``overrides``; a ``batch_size`` of 0 keeps the table's."""
    spec_path, batch = METHODS[method]
    overrides = {**overrides, "batch_size": overrides.get("batch_size") or batch}
    return load_config(os.path.join(ROOT, spec_path.format(local_crops=local_crops)), overrides)


def torch_spec(config: ml_collections.ConfigDict, method: Any) -> dict[str, Any]:
    """What torch_peer.py needs to build the same step, read off the config and the method."""
    enc, o = method.encoder, config.optim
    spec = {"method": config.method, "batch_size": config.batch_size, "threads": 2,
            "data_image_size": config.data.image_size, "image_size": config.aug.view1.size,
            "views": [view_spec(config.aug.view1), view_spec(config.aug.view2)],
            "optim": {"name": o.name, "b1": o.b1, "b2": o.b2, "weight_decay": o.weight_decay,
                      "clip": o.grad_clip_norm, "clip_kind": o.grad_clip_kind}}
    if hasattr(enc, "patch_size"):
        spec["model"] = {"patch": enc.patch_size, "dim": enc.dim, "depth": enc.depth,
                         "heads": enc.num_heads, "mlp_ratio": enc.mlp_ratio,
                         "drop_path": enc.drop_path_rate, "layer_scale": enc.layer_scale_init}
    else:
        spec["model"] = {"width": enc.width_multiplier}
    if config.method == "simclr":
        c = config.simclr
        spec["simclr"] = {"hidden": c.proj_hidden_dim, "out": c.proj_out_dim,
                          "layers": c.proj_layers, "temperature": c.temperature}
    elif config.method == "mae":
        c = config.mae
        spec["mae"] = {"mask_ratio": c.mask_ratio, "norm_pix": c.norm_pix_loss,
                       "decoder_dim": c.decoder_dim, "decoder_depth": c.decoder_depth,
                       "decoder_heads": c.decoder_heads}
    elif config.method == "beit":
        t = method.tokenizer_config.dvae
        spec["beit"] = {"vocab": config.beit.vocab_size, "num_masked": method.num_masked,
                        "tok_size": method.tokenizer.image_size, "tok_hidden": t.hidden_dim,
                        "tok_downsample": t.num_downsample, "tok_res_blocks": t.num_res_blocks}
    elif config.method == "dino":
        c, aug = config.dino, config.aug
        spec["views"].append(view_spec(aug.local))
        spec["dino"] = {"out": c.out_dim, "hidden": c.hidden_dim, "bottleneck": c.bottleneck_dim,
                        "teacher_temp": c.teacher_temp, "student_temp": c.student_temp,
                        "center_momentum": c.center_momentum,
                        "global_crops": aug.num_global_crops, "local_crops": aug.num_local_crops}
    return spec


class TorchPeer:
    """The persistent torch subprocess (benchmarks/torch_peer.py under the peers' Python)."""

    def __init__(self, python: str, spec: dict[str, Any], inherit_malloc: bool = False):
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
        if not inherit_malloc:  # torch as users run it: the C library's malloc
            for name in MALLOC_ENV:
                env.pop(name, None)
        self.proc = subprocess.Popen(
            [python, os.path.join(ROOT, "benchmarks", "torch_peer.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=env)
        self.peak_rss_mb = float("nan")  # known after the first run()
        self.ready = self._ask(spec)["ready"]

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch peer exited (code {self.proc.wait()}); see above")
        return json.loads(line)

    def run(self, mode: str, steps: int) -> list[float]:
        reply = self._ask({"mode": mode, "steps": steps})
        self.peak_rss_mb = reply["peak_rss_mb"]  # the peer's high-water mark so far
        return reply["times"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def compare(method: str, steps: int, rounds: int, python: str, batch_size: int = 0,
            warmup: int = 2, threads: int = 2, flush_denormal: bool = True,
            torch_malloc: str = "system", dtype: str = "float32", local_crops: int = 2
            ) -> dict[str, Any]:
    config = method_config(method, {"batch_size": batch_size, "model.dtype": dtype}, local_crops)
    load_before = os.getloadavg()[0]
    bench = StepBench(config)
    spec = {**torch_spec(config, bench.method), "warmup": warmup, "threads": threads,
            "flush_denormal": flush_denormal, "autocast_bf16": dtype == "bfloat16"}
    peer = TorchPeer(python, spec, inherit_malloc=torch_malloc == "inherit")
    try:
        bench.compile()
        bench.run(warmup)
        bench.cpu_times.clear()
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        ratios: dict[str, list[float]] = {"eager": [], "compile": []}
        peaks = []
        for r in range(rounds):
            order = SIDES[r % 3:] + SIDES[:r % 3]
            this = {side: bench.run(steps) if side == "jax" else peer.run(side, steps)
                    for side in order}
            for side in SIDES:
                times[side] += this[side]
            for side in ratios:
                ratios[side].append(statistics.median(this[side])
                                    / statistics.median(this["jax"]))
            peaks.append(flops.matmul_peak_flops(repeats=3, compute_dtype=bench.compute_dtype))
    finally:
        peer.close()
    result = summarize(bench, times["jax"], peaks)
    result.update({
        "torch_eager_step_ms": 1e3 * statistics.median(times["eager"]),
        "torch_compile_step_ms": 1e3 * statistics.median(times["compile"]),
        "ratio_vs_torch_eager": statistics.median(ratios["eager"]),
        "ratio_vs_torch_compile": statistics.median(ratios["compile"]),
        "ratio_compile_per_round": [round(x, 3) for x in ratios["compile"]],
        "ratio_eager_per_round": [round(x, 3) for x in ratios["eager"]],
        **{k: round(v, 2) if isinstance(v, float) else v for k, v in peer.ready.items()},
        "allocator_jax": allocator.active(),
        "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0],
    })
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    parser.add_argument("--steps", type=int, default=0, help="steps per side per round")
    parser.add_argument("--rounds", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=0, help="0: the method's default")
    parser.add_argument("--threads", type=int, default=2, choices=(1, 2),
                        help="2: both cores each; 1: both sides pinned to one core")
    parser.add_argument("--torch_denormals", action="store_true",
                        help="keep torch's default (no flush of denormals to zero)")
    parser.add_argument("--torch_malloc", default="system", choices=("system", "inherit"),
                        help="system: torch without this process's LD_PRELOAD/MALLOC_CONF (as "
                        "users run it); inherit: the same allocator as the JAX side")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype: the project's config.model.dtype, torch's autocast")
    parser.add_argument("--local_crops", type=int, default=2,
                        help="DINO's local crops (the CIFAR-10 preset has 6)")
    parser.add_argument("--peers_python", default=os.environ.get(
        "SSL_JAX_PEERS_PYTHON", "/tmp/peers/bin/python"))
    args = parser.parse_args()
    steps = args.steps or (2 if args.quick else 4)
    rounds = args.rounds or (3 if args.quick else 5)
    if not os.path.exists(args.peers_python):
        sys.exit(f"error: {args.peers_python} not found; build the peers' environment with "
                 "bash ../shared/peers/setup.sh /tmp/peers (or pass --peers_python)")
    if args.threads == 1:  # before JAX starts its CPU client: its pool then has one core
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    result = compare(args.method, steps, rounds, args.peers_python, args.batch_size,
                     threads=args.threads, flush_denormal=not args.torch_denormals,
                     torch_malloc=args.torch_malloc, dtype=args.dtype,
                     local_crops=args.local_crops)
    for key, value in result.items():
        print(f"  {key:<26} {value:.4g}" if isinstance(value, float) else f"  {key:<26} {value}")
    print(json.dumps({"method": args.method, **result}))
    print(f"method={args.method} ratio_vs_torch_compile={result['ratio_vs_torch_compile']:.2f} "
          f"ratio_vs_torch_eager={result['ratio_vs_torch_eager']:.2f} mfu={result['mfu']:.2f}")


if __name__ == "__main__":
    main()

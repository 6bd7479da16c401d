r"""Where the ResNet step's time goes against torch: every convolution of the CIFAR ResNet-18
(CIFAR stem, width 1) timed alone, forward, input gradient and weight gradient, as the project's
step runs it on XLA:CPU and as torch eager runs it (oneDNN), side by side::

    bash ../shared/peers/setup.sh /tmp/peers        # once: torch (CPU)
    python -m benchmarks.conv_layers --batch_size 512 [--rounds 3] [--xla_weight_grad]

``--batch_size`` counts the images a convolution sees (SimCLR's two views of a batch of 256 are
512). The JAX side times the project's own pieces (``ssl_jax/models/layers.py``): the forward
``lax.conv_general_dilated`` in NHWC, the input gradient XLA derives from it, and the chunked
im2col weight gradient (``--xla_weight_grad`` adds XLA's own derivative, the one it replaced).
The torch side (the peers' Python, a subprocess per round; it never imports JAX) times
``F.conv2d`` and ``aten.convolution_backward`` with one output each, NCHW as lightly's ResNet
runs, ``torch.set_num_threads`` at the core count. Rounds alternate the two sides; each figure is
the median over rounds of the median of ``--reps`` calls. The totals weight each layer by how
often ResNet-18 has it, so ``total`` is the convolutions' share of one forward + backward.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

# name, in channels, out channels, kernel, stride, input side, how many in ResNet-18 (CIFAR stem)
LAYERS = (
    ("stem", 3, 64, 3, 1, 32, 1),
    ("s1", 64, 64, 3, 1, 32, 4),
    ("s2_first", 64, 128, 3, 2, 32, 1),
    ("s2", 128, 128, 3, 1, 16, 3),
    ("s2_proj", 64, 128, 1, 2, 32, 1),
    ("s3_first", 128, 256, 3, 2, 16, 1),
    ("s3", 256, 256, 3, 1, 8, 3),
    ("s3_proj", 128, 256, 1, 2, 16, 1),
    ("s4_first", 256, 512, 3, 2, 8, 1),
    ("s4", 512, 512, 3, 1, 4, 3),
    ("s4_proj", 256, 512, 1, 2, 8, 1),
)
OPS = ("forward", "input_grad", "weight_grad")


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _jax_layer_ops(layer: tuple, batch: int, xla_weight_grad: bool) -> dict[str, tuple]:
    """``{op: (jitted function, its arguments)}`` of one convolution of :data:`LAYERS`."""
    import jax

    from ssl_jax.models import layers

    _, cin, cout, k, stride, side, _ = layer
    pad, strides = ((k // 2, k // 2),) * 2, (stride, stride)
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (batch, side, side, cin))
    w = jax.random.normal(keys[1], (k, k, cin, cout)) * 0.05

    def conv(x, w):
        return layers._lax_conv(x, w, strides, pad)

    g = jax.random.normal(keys[2], jax.eval_shape(conv, x, w).shape)
    ops = {
        "forward": (jax.jit(conv), (x, w)),
        "input_grad": (jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]),
                       (x, w, g)),
        "weight_grad": (jax.jit(lambda x, g: layers._conv_weight_grad(
            x, g, (k, k, cin, cout), strides, pad)), (x, g)),
    }
    if xla_weight_grad:
        ops["xla_weight_grad"] = (jax.jit(lambda x, w, g: jax.vjp(
            lambda w: conv(x, w), w)[1](g)[0]), (x, w, g))
    return ops


def time_jax(batch: int, reps: int, xla_weight_grad: bool) -> dict[str, dict[str, float]]:
    import jax

    out = {}
    for layer in LAYERS:
        ops = _jax_layer_ops(layer, batch, xla_weight_grad)
        out[layer[0]] = {op: _median_ms(functools.partial(_run_jax, fn, args), reps)
                         for op, (fn, args) in ops.items()}
        del ops
    jax.clear_caches()
    return out


def _run_jax(fn, args) -> None:
    fn(*args).block_until_ready()


def time_torch(batch: int, reps: int, threads: int) -> dict[str, dict[str, float]]:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    out = {}
    with torch.no_grad():
        for name, cin, cout, k, stride, side, _ in LAYERS:
            x = torch.randn(batch, cin, side, side)
            w = torch.randn(cout, cin, k, k) * 0.05
            y = F.conv2d(x, w, stride=stride, padding=k // 2)
            g = torch.randn_like(y)

            def backward(mask, x=x, w=w, g=g, stride=stride, k=k):
                return torch.ops.aten.convolution_backward(
                    g, x, w, None, [stride] * 2, [k // 2] * 2, [1, 1], False, [0, 0], 1, mask)

            fns = {"forward": lambda x=x, w=w, stride=stride, k=k: F.conv2d(
                       x, w, stride=stride, padding=k // 2),
                   "input_grad": lambda: backward([True, False, False]),
                   "weight_grad": lambda: backward([False, True, False])}
            out[name] = {op: _median_ms(fn, reps) for op, fn in fns.items()}
    return out


def gflop(batch: int) -> dict[str, float]:
    """Multiply-adds x 2 of one op (forward, input and weight gradients cost the same)."""
    return {name: 2e-9 * batch * (side // stride) ** 2 * cin * cout * k * k
            for name, cin, cout, k, stride, side, _ in LAYERS}


def report(jax_rounds: list[dict], torch_rounds: list[dict], batch: int) -> str:
    def med(rounds, name, op):
        return statistics.median(r[name][op] for r in rounds)

    flops = gflop(batch)
    lines = [f"batch {batch} (images per convolution); ms per call, JAX (XLA:CPU) / torch eager; "
             "ratio = torch time / JAX time (>= 1: JAX as fast)", "",
             "| layer (x count) | GFLOP | " + " | ".join(OPS) + " |", "|---|---|---|---|---|"]
    totals = {op: [0.0, 0.0] for op in OPS}
    for name, *_, count in LAYERS:
        cells = []
        for op in OPS:
            j, t = med(jax_rounds, name, op), med(torch_rounds, name, op)
            totals[op][0] += count * j
            totals[op][1] += count * t
            cells.append(f"{j:.1f} / {t:.1f} ({t / j:.2f}x)")
        lines.append(f"| {name} (x{count}) | {flops[name]:.2f} | " + " | ".join(cells) + " |")
    all_j = sum(v[0] for v in totals.values())
    all_t = sum(v[1] for v in totals.values())
    lines.append("| **total** | | " + " | ".join(
        f"{j:.0f} / {t:.0f} ({t / j:.2f}x)" for j, t in totals.values()) + " |")
    lines += ["", f"all convolutions of one forward + backward: JAX {all_j:.0f} ms, torch "
              f"{all_t:.0f} ms, ratio {all_t / all_j:.2f}x"]
    if "xla_weight_grad" in jax_rounds[0][LAYERS[0][0]]:
        xla = sum(count * med(jax_rounds, name, "xla_weight_grad")
                  for name, *_, count in LAYERS)
        lines.append(f"XLA's own weight gradient (replaced by the chunked im2col): {xla:.0f} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--xla_weight_grad", action="store_true")
    parser.add_argument("--peers_python", default=os.environ.get(
        "SSL_JAX_PEERS_PYTHON", "/tmp/peers/bin/python"))
    parser.add_argument("--side", choices=("both", "torch"), default="both",
                        help=argparse.SUPPRESS)  # 'torch': the subprocess's role
    args = parser.parse_args()
    if args.side == "torch":
        print(json.dumps(time_torch(args.batch_size, args.reps, args.threads)))
        return
    if not os.path.exists(args.peers_python):
        sys.exit(f"error: {args.peers_python} not found; build the peers' environment with "
                 "bash ../shared/peers/setup.sh /tmp/peers (or pass --peers_python)")
    torch_cmd = [args.peers_python, __file__, "--side", "torch", "--batch_size",
                 str(args.batch_size), "--reps", str(args.reps), "--threads", str(args.threads)]
    jax_rounds, torch_rounds = [], []
    for _ in range(args.rounds):
        jax_rounds.append(time_jax(args.batch_size, args.reps, args.xla_weight_grad))
        done = subprocess.run(torch_cmd, check=True, capture_output=True, text=True)
        torch_rounds.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(report(jax_rounds, torch_rounds, args.batch_size))


if __name__ == "__main__":
    main()

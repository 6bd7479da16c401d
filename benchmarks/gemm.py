r"""The train step's own matrix products, timed alone in XLA and in PyTorch: the GEMM ceiling.

    python -m benchmarks.gemm --config configs/mae.py:data=cifar10 [--batch_size=64]
        [--peers_python /tmp/peers/bin/python] [--threads 2] [--repeats 7]

Compiles the trainer's step of the config (``benchmarks.throughput.StepBench``), reads every
plain matrix product out of XLA's optimised program (``dot`` instructions whose operands are
2-D: the dense layers' forward and both backward products, the heads), and times each distinct
``(M, K, N, layout)`` twice, alone, on the same 2-D float32 operands: once as one jitted XLA
``dot_general`` (XLA:CPU's own kernel choice: YNNPACK on this jaxlib), once as ``torch.matmul``
in the peers' environment (``bash ../shared/peers/setup.sh /tmp/peers``; MKL on x86) with the
same transposition (torch takes transposed views without copying). Each time is the median of
``--repeats`` timings of 10 back-to-back products.

The sum over the step's products (time x count) is what the step's matrix work costs on each
library at its best, with no attention, no element-wise work and no scheduling: if XLA's sum is
``r`` times torch's, a matmul-bound step on XLA can be at most about ``1/r`` as fast as the same
step on torch, whatever else is done. Batched products (attention) and convolutions are listed
as counts only. Last line: ``gemm_xla_ms=X gemm_torch_ms=Y xla_over_torch=R``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEF = re.compile(r"%([\w.\-]+) = (\w+)\[([\d,]*)\]")
_DOT = re.compile(r"= f32\[[\d,]*\][^\n]*? dot\(%([\w.\-]+), %([\w.\-]+)\), "
                  r"lhs_contracting_dims=\{(\d)\}, rhs_contracting_dims=\{(\d)\}")


def step_gemms(hlo_text: str) -> collections.Counter:
    """``{(M, K, N, lhs_transposed, rhs_transposed): count}`` of the 2-D float32 dots of an
    optimised HLO module (``compiled.as_text()``): ``lhs [M, K]`` (stored ``[K, M]`` when
    transposed), ``rhs [K, N]`` (stored ``[N, K]`` when transposed). Batched dots (with batch
    dimensions: 3-D or more operands) are left out."""
    shapes = {m.group(1): (m.group(2), [int(d) for d in m.group(3).split(",") if d])
              for m in _DEF.finditer(hlo_text)}
    gemms: collections.Counter = collections.Counter()
    for m in _DOT.finditer(hlo_text):
        (a_type, a), (b_type, b) = (shapes.get(m.group(i), ("", [])) for i in (1, 2))
        if a_type != "f32" or b_type != "f32" or len(a) != 2 or len(b) != 2:
            continue
        lhs_t, rhs_t = m.group(3) == "0", m.group(4) == "1"
        M, K = (a[1], a[0]) if lhs_t else (a[0], a[1])
        N = b[0] if rhs_t else b[1]
        gemms[(M, K, N, lhs_t, rhs_t)] += 1
    return gemms


def _operands(M: int, K: int, N: int, lhs_t: bool, rhs_t: bool, lib, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((K, M) if lhs_t else (M, K), dtype=np.float32)
    b = rng.standard_normal((N, K) if rhs_t else (K, N), dtype=np.float32)
    return lib(a), lib(b)


def _median_time(fn, repeats: int, inner: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def time_torch(shapes: list[list], repeats: int, threads: int) -> list[float]:
    """Seconds per product of each shape with ``torch.matmul`` (runs in the peers' Python)."""
    import torch

    torch.set_num_threads(threads)
    out = []
    for M, K, N, lhs_t, rhs_t in shapes:
        a, b = _operands(M, K, N, lhs_t, rhs_t, torch.from_numpy)
        a, b = (a.t() if lhs_t else a), (b.t() if rhs_t else b)
        out.append(_median_time(lambda a=a, b=b: torch.matmul(a, b), repeats))
    return out


def time_xla(shapes: list[tuple], repeats: int) -> list[float]:
    """Seconds per product of each shape as one jitted ``lax.dot_general``."""
    import jax

    out = []
    for M, K, N, lhs_t, rhs_t in shapes:
        a, b = _operands(M, K, N, lhs_t, rhs_t, jax.numpy.asarray)
        dims = (((0 if lhs_t else 1,), (1 if rhs_t else 0,)), ((), ()))
        product = jax.jit(lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims))
        out.append(_median_time(lambda a=a, b=b, f=product: f(a, b).block_until_ready(),
                                repeats))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mae.py:data=cifar10")
    parser.add_argument("--batch_size", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch's intra-op threads")
    parser.add_argument("--peers_python", default=os.environ.get(
        "SSL_JAX_PEERS_PYTHON", "/tmp/peers/bin/python"))
    parser.add_argument("--torch_side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_side:  # the peers' process: shapes on stdin, times on stdout
        shapes = json.loads(sys.stdin.read())
        print(json.dumps(time_torch(shapes, args.repeats, args.threads)))
        return
    if not os.path.exists(args.peers_python):
        sys.exit(f"error: {args.peers_python} not found; build the peers' environment with "
                 "bash ../shared/peers/setup.sh /tmp/peers (or pass --peers_python)")
    from benchmarks.throughput import StepBench, load_config

    overrides = {"batch_size": args.batch_size} if args.batch_size else {}
    bench = StepBench(load_config(args.config, overrides))
    hlo = bench.step.compile(bench.state, bench.batch).as_text()
    gemms = step_gemms(hlo)
    if not gemms:
        sys.exit("error: no 2-D float32 dot in the step's optimised HLO")
    shapes = sorted(gemms, key=lambda s: -s[0] * s[1] * s[2] * gemms[s])
    xla = time_xla(shapes, args.repeats)
    torch_run = subprocess.run(
        [args.peers_python, "-m", "benchmarks.gemm", "--torch_side",
         f"--repeats={args.repeats}", f"--threads={args.threads}"],
        input=json.dumps([list(s) for s in shapes]), capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}, check=True)
    torch_times = json.loads(torch_run.stdout.strip().splitlines()[-1])
    total = {"xla": 0.0, "torch": 0.0}
    print(f"{'M x K x N (T: transposed operand)':<36} {'count':>5} {'XLA GF/s':>9} "
          f"{'torch GF/s':>10} {'XLA/torch time':>14}")
    for shape, t_xla, t_torch in zip(shapes, xla, torch_times, strict=True):
        M, K, N, lhs_t, rhs_t = shape
        flop, count = 2 * M * K * N, gemms[shape]
        total["xla"] += count * t_xla
        total["torch"] += count * t_torch
        name = f"{M}{'T' if lhs_t else ''} x {K} x {N}{'T' if rhs_t else ''}"
        print(f"{name:<36} {count:>5} {flop / t_xla / 1e9:>9.0f} {flop / t_torch / 1e9:>10.0f} "
              f"{t_xla / t_torch:>14.2f}")
    batched = len(re.findall(r" dot\(%[^)]*\), lhs_batch_dims", hlo))
    convs = len(re.findall(r" convolution\(", hlo))
    print(f"not timed: {batched} batched dots (attention), {convs} convolutions")
    print(f"gemm_xla_ms={1e3 * total['xla']:.2f} gemm_torch_ms={1e3 * total['torch']:.2f} "
          f"xla_over_torch={total['xla'] / total['torch']:.2f}")


if __name__ == "__main__":
    main()

"""FLOPs of a compiled step and the measured matmul peak of a device: model FLOP utilisation.

``MFU = (FLOPs of one train step / step time) / peak``, where

- the FLOPs are XLA's own count for the compiled step (``compiled.cost_analysis()['flops']``):
  the **whole** train step, forward + backward + optimizer update (and the method's on-device
  augmentation, EMA teacher, ...), of the program one device runs;
- the peak is **measured**, not a datasheet figure: the median FLOP/s of a large matmul on the
  same device (on CPU in the model's compute dtype, ``config.model.dtype``: float32, or bfloat16
  accumulated in float32; bfloat16 on GPU/TPU), so an MFU near 1 means the step runs as fast as
  the device's best dense kernel for its precision does on this machine at this moment.

The trainer logs ``mfu`` beside ``images_per_sec`` (see :class:`CountedStep` and
:func:`peak_flops`); ``benchmarks/throughput.py`` reports the same figures for any config.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PEAK_ENV = "SSL_JAX_PEAK_FLOPS"
"""Environment variable: a peak in FLOP/s to use instead of measuring one (e.g. a datasheet
figure, or one measured once on an idle machine); ``0`` leaves ``mfu`` out of the metrics."""


def compiled_flops(compiled: Any) -> float:
    """FLOPs of one call of a ``jax.stages.Compiled`` (XLA's cost analysis), NaN when the
    backend reports none. Under ``jit`` over a mesh this is the per-device program."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops", math.nan)
    return float(flops) if flops is not None and flops >= 0 else math.nan


def default_matmul(platform: str, compute_dtype: Any = "float32") -> tuple[int, Any]:
    """``(side, dtype)`` of the peak's square matmul: 2048 in the model's compute dtype on CPU
    (float32 or bfloat16), bfloat16 8192 on accelerators (their fast matmul units)."""
    if platform == "cpu":
        return 2048, jnp.dtype(compute_dtype)
    return 8192, jnp.dtype(jnp.bfloat16)


def matmul_peak_flops(
    size: int | None = None, dtype: Any = None, repeats: int = 5,
    device: jax.Device | None = None, compute_dtype: Any = "float32",
) -> float:
    """Measured peak of ``device`` (default: the first): the median FLOP/s of ``repeats``
    timed ``[size, size] @ [size, size]`` products (``2 size^3`` FLOPs each, accumulated and
    returned in float32, as the models' layers ask) after one warm-up, each waited for.
    ``size``/``dtype`` default to :func:`default_matmul` for the model's ``compute_dtype``."""
    device = device or jax.devices()[0]
    side, kind = default_matmul(device.platform, compute_dtype)
    size, dtype = size or side, dtype or kind
    rng = np.random.default_rng(0)
    a, b = (jax.device_put(jnp.asarray(rng.standard_normal((size, size)), dtype), device)
            for _ in range(2))
    matmul = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / statistics.median(times)


@functools.cache
def peak_flops(compute_dtype: str = "float32") -> float:
    """The trainer's peak (FLOP/s), measured once per process and compute dtype (under a
    second: a few 1024-side matmuls in ``compute_dtype`` on CPU, 8192-side bfloat16 ones on an
    accelerator), or taken from the environment variable ``SSL_JAX_PEAK_FLOPS``. NaN when it
    cannot be measured."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV])
    try:
        platform = jax.devices()[0].platform
        return matmul_peak_flops(1024 if platform == "cpu" else None, repeats=7,
                                 compute_dtype=compute_dtype)
    except Exception:  # noqa: BLE001 - a missing peak only drops the mfu metric
        return math.nan


def mfu(flops_per_step: float, steps_per_sec: float, peak: float) -> float:
    """Achieved FLOP/s over the peak; NaN when a figure is missing."""
    if not (peak > 0 and math.isfinite(flops_per_step)):
        return math.nan
    return flops_per_step * steps_per_sec / peak


def mfu_metric(flops_per_step: float, steps_per_sec: float, peak: float) -> dict[str, float]:
    """``{'mfu': ...}`` for the trainer's metrics, or ``{}`` when a figure is missing."""
    value = mfu(flops_per_step, steps_per_sec, peak)
    return {"mfu": value} if math.isfinite(value) else {}


class CountedStep:
    """A ``jax.jit``-ed step compiled once, at its first call, through ``lower().compile()``, so
    that XLA's FLOP count of the very executable that runs is known (:attr:`flops`). Shardings
    and donation are those of the jitted function; later calls go straight to the executable."""

    def __init__(self, jitted: Any):
        self.jitted = jitted
        self.compiled = None
        self.flops = math.nan

    def compile(self, *args: Any) -> Any:
        """Compiles for ``args`` (arrays or ``jax.ShapeDtypeStruct``) unless already done."""
        if self.compiled is None:
            self.compiled = self.jitted.lower(*args).compile()
            self.flops = compiled_flops(self.compiled)
        return self.compiled

    def __call__(self, *args: Any) -> Any:
        return self.compile(*args)(*args)

"""The test session's XLA settings, in one place for conftest.py and for the tests that start
``python -m ssl_jax.train`` (or a launch script) in a subprocess with its own ``XLA_FLAGS``.

- ``CPU_COMPILE_FLAGS``: XLA:CPU at backend optimisation level 0 compiles about twice as fast
  (a 6-step runlocal SimCLR run: 24 s of CPU instead of 48 s); the tests' programs are tiny, so
  running them unoptimised costs less than compiling them optimised. The flag changes no
  arithmetic the tests compare (no fast-math at any level), and every run a test compares with
  another uses it too.
- A persistent compilation cache shared by every worker and subprocess of the session (and by
  later sessions): ``$SSL_JAX_TEST_XLA_CACHE``, else ``$TMPDIR/ssl_jax_test_xla_cache-<uid>``; set
  ``SSL_JAX_TEST_XLA_CACHE=`` (empty) to compile everything afresh. Small programs are cached
  too (no minimum compile time or size). A hit is the executable XLA compiled for the same
  program, the same XLA flags (device count included), the same compile options and the same
  jax/jaxlib, so it computes what a fresh compilation computes.
"""

from __future__ import annotations

import os
import tempfile

CPU_COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
    """``XLA_FLAGS`` for a test subprocess: the session's compile options, ``devices`` forced CPU
    devices (None: XLA's default of 1)."""
    flags = CPU_COMPILE_FLAGS
    if devices is not None:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return flags


def cache_env() -> dict[str, str]:
    """The ``JAX_*`` variables that turn the persistent compilation cache on (jax reads them at
    import, and subprocesses inherit them); empty where the cache is turned off."""
    default = os.path.join(tempfile.gettempdir(), f"ssl_jax_test_xla_cache-{os.getuid()}")
    cache_dir = os.environ.get("SSL_JAX_TEST_XLA_CACHE", default)
    if not cache_dir:
        return {}
    return {"JAX_COMPILATION_CACHE_DIR": cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

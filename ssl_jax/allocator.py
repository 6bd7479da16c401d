"""Which heap allocator this process runs on, and why it matters for XLA:CPU.

XLA:CPU allocates each step's temporaries as one large block (about 300 MiB for the CIFAR-10 MAE
step at batch 64) and frees it when the step ends. glibc's malloc serves blocks that large with a
fresh ``mmap`` and returns them with ``munmap``, so every step page-faults its whole temporary
memory again: about 78 000 minor faults and 100 ms of kernel time per MAE step on the 2-core
machine of docs/benchmarks.md, where jemalloc (``oversize_threshold:0``: large blocks stay in
its arenas, returned to the OS only after the usual idle decay) or tcmalloc keep the pages and
the step runs about 1.25x faster (``python -m benchmarks.vs_torch``, "Host allocator").

An allocator can only be chosen when the process starts (``LD_PRELOAD``): the launch scripts do
it (``launch/common.sh``, ``--malloc``); this module reports what was chosen, for the logs and
the benchmarks.
"""

from __future__ import annotations

import os

JEMALLOC_CONF = "oversize_threshold:0,background_thread:true"
"""``MALLOC_CONF`` the launch scripts give jemalloc: large blocks go to the ordinary arenas (not
the oversize arena that returns them at once), purged by a background thread after idle time."""

_KNOWN = (("jemalloc", "libjemalloc"), ("tcmalloc", "libtcmalloc"), ("mimalloc", "libmimalloc"))


def active(maps_path: str = "/proc/self/maps") -> str:
    """``"jemalloc"``, ``"tcmalloc"`` or ``"mimalloc"`` when that library is mapped into the
    process (preloaded), else ``"system"`` (the C library's malloc, or unknown off Linux)."""
    try:
        with open(maps_path, encoding="utf-8", errors="replace") as maps:
            libraries = {line.rsplit("/", 1)[-1].strip() for line in maps if "/" in line}
    except OSError:
        return "system"
    for name, prefix in _KNOWN:
        if any(lib.startswith(prefix) for lib in libraries):
            return name
    return "system"


def hint(backend: str, allocator: str | None = None) -> str | None:
    """One line for the logs when a CPU run uses the system allocator, else ``None``."""
    allocator = allocator or active()
    if backend != "cpu" or allocator != "system":
        return None
    preload = os.environ.get("LD_PRELOAD", "")
    return ("host allocator: the C library's malloc%s. XLA:CPU steps run about 1.25x faster with "
            "jemalloc or tcmalloc (apt-get install libjemalloc2; the launch/ scripts preload it: "
            "see docs/performance.md, 'Host allocator')"
            % (f" (LD_PRELOAD={preload!r} has none of jemalloc/tcmalloc)" if preload else ""))

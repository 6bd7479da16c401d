"""The peak resident set of this process, for the benchmarks (imported by the peers' Python too:
no JAX, no torch)."""

from __future__ import annotations


def peak_rss_mb() -> float:
    """``VmHWM`` of ``/proc/self/status`` in MiB: this process image's own high-water mark.
    (``getrusage``'s ``ru_maxrss`` is not: a child started by fork and exec inherits its
    parent's resident set at the fork as its starting maximum.) NaN where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return float("nan")

"""How a training run ends when something interferes: a preemption notice or a non-finite value.

Exit codes of ``python -m ssl_jax.train`` (set by :func:`ssl_jax.cli.run`):

====  ==========================================================================================
0     done, or ``--stop_at_step`` reached (a checkpoint of that step is saved)
1     a bug: an unexpected exception, with its traceback
2     a user error (config, data, workdir): one line naming the fix (see :mod:`ssl_jax.cli`)
3     the machine refused a read or write (disk full, permissions; see :mod:`ssl_jax.cli`)
4     :data:`EXIT_NONFINITE`: a NaN/Inf loss or gradient with ``on_nonfinite='stop'``; the
      message names the step; no checkpoint after it was written, the older ones are kept
75    :data:`EXIT_PREEMPTED` (``EX_TEMPFAIL``: try again): a preemption notice (SIGTERM, or
      JAX's multi-host preemption sync point) ended the run after the current step, whose
      checkpoint (state and data position) is complete on disk; the same command resumes
====  ==========================================================================================

A process killed outright (SIGKILL, exit status 137 in a shell) resumes from its newest complete
checkpoint when started again; a save it interrupted is never mistaken for a checkpoint.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import jax
from absl import logging

EXIT_NONFINITE = 4
EXIT_PREEMPTED = 75


class NonFiniteError(RuntimeError):
    """Training produced a NaN or Inf loss or gradient and ``on_nonfinite='stop'``."""


class Preempted(Exception):
    """The run stopped for a preemption notice after saving the checkpoint of ``step``."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


class PreemptionWatcher:
    """Says, step by step, whether the run must save a checkpoint and stop for a preemption.

    A multi-process run (``jax.process_count() > 1``) asks Orbax's
    ``CheckpointManager.reached_preemption(step)``, i.e. JAX's preemption sync manager started
    by ``jax.distributed.initialize``: a SIGTERM to any process reaches all of them, and they
    agree on the one step at which all save. Every process must ask at every step. A single
    process installs its own SIGTERM handler, which only sets a flag, for the duration of the
    ``with`` block (in the main thread only); the previous handler is restored on exit.
    """

    def __init__(self) -> None:
        self._signalled = False
        self._previous = None
        self._installed = False
        self._multi_process = False

    def __enter__(self) -> PreemptionWatcher:
        self._multi_process = jax.process_count() > 1
        if not self._multi_process:
            if threading.current_thread() is threading.main_thread():
                self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
                self._installed = True
            else:
                logging.info("not in the main thread: SIGTERM will not save a checkpoint")
        return self

    def __exit__(self, *exc_info) -> None:
        if self._installed:
            # A handler installed outside Python reads as None and cannot be put back.
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGTERM, previous)
            self._installed = False

    def _on_sigterm(self, signum, frame) -> None:
        self._signalled = True  # Only a flag: the loop logs and saves at the end of the step.

    def signalled(self) -> bool:
        """Whether this process received SIGTERM (single-process runs only)."""
        return self._signalled

    def reached(self, step: int, sync_point: Callable[[int], bool]) -> bool:
        """Whether to save at ``step`` and stop; ``sync_point`` is the checkpoint manager's
        ``reached_preemption`` (asked in multi-process runs)."""
        if self._multi_process:
            return bool(sync_point(step))
        return self._signalled

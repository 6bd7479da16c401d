r"""The trainer, started like ``python -m ssl_jax.train``, with one fault injected (for tests).

    PYTHONPATH=. python tests/fault_driver.py --fault=KIND[:N] --config ... --workdir ...

KIND:

- ``batch:N``: SIGKILL while the N-th batch of this invocation is assembled, i.e. during a step
  between checkpoints (the step before it may still be running on the device); saves in flight
  are waited for first, so that which checkpoints exist afterwards does not depend on timing;
- ``commit:S``: SIGKILL in Orbax's commit thread during the asynchronous save of step S, after
  its files are written and just before the checkpoint is finalised (renamed to ``<S>``);
- ``saved:S``: SIGKILL right after the checkpoint of step S is complete on disk;
- ``restore``: SIGKILL during start-up, right after the checkpoint was read;
- ``sigterm:N``: SIGTERM to itself while the N-th batch is assembled (a preemption notice);
- ``nan:S``: the loss, and so the gradient, of step S (1-based) is NaN.

Each SIGKILL is announced on stderr first (``fault_driver: SIGKILL ...``).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import jax.numpy as jnp
from absl import flags
from etils import epath

from ssl_jax import checkpoint as ckpt_lib
from ssl_jax import cli, methods, parallel, train

flags.DEFINE_string("fault", "", "KIND[:N]; see the module docstring.")


def _kill(where: str, sig: int = signal.SIGKILL) -> None:
    print(f"fault_driver: {signal.Signals(sig).name} {where}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), sig)


def _on_batch(n: int, sig: int) -> None:
    original, calls, managers = parallel.global_batch, [0], []
    original_init = ckpt_lib.RunCheckpoints.__init__

    def init(self, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        managers.append(self)

    def global_batch(*args: Any, **kwargs: Any):
        calls[0] += 1
        if calls[0] == n:
            for checkpoints in managers:
                checkpoints.wait()
            _kill(f"at batch {n} of this invocation", sig)
        return original(*args, **kwargs)

    ckpt_lib.RunCheckpoints.__init__ = init
    parallel.global_batch = global_batch


def _on_commit(step: int) -> None:
    path_class = type(epath.Path("/"))
    original = path_class.rename

    def rename(self, target, *args: Any, **kwargs: Any):
        target = epath.Path(target)
        if target.name == str(step) and target.parent.name == "checkpoints":
            _kill(f"while finalising the checkpoint of step {step} ({self.name})")
        return original(self, target, *args, **kwargs)

    path_class.rename = rename


def _on_saved(step: int) -> None:
    original = ckpt_lib.RunCheckpoints.save

    def save(self, at: int, *args: Any, **kwargs: Any):
        original(self, at, *args, **kwargs)
        if at == step:
            self.wait()
            _kill(f"after the checkpoint of step {step} completed")

    ckpt_lib.RunCheckpoints.save = save


def _on_restore() -> None:
    original = ckpt_lib.RunCheckpoints.restore

    def restore(self, step: int, *args: Any, **kwargs: Any):
        state = original(self, step, *args, **kwargs)
        _kill(f"after reading the checkpoint of step {step}")
        return state

    ckpt_lib.RunCheckpoints.restore = restore


class _NaNAt:
    """A method whose loss is multiplied by NaN at one step (0-based ``state['step']``)."""

    def __init__(self, method: Any, step: int):
        self._method, self._step = method, step

    def __getattr__(self, name: str) -> Any:
        return getattr(self._method, name)

    def loss(self, params, extra, batch, rng, step):
        loss, aux = self._method.loss(params, extra, batch, rng, step)
        return loss * jnp.where(step == self._step, jnp.nan, 1.0), aux


def _on_nan(step: int) -> None:
    original = methods.create

    def create(*args: Any, **kwargs: Any):
        return _NaNAt(original(*args, **kwargs), step - 1)

    methods.create = create


def install(fault: str) -> None:
    """Patches the trainer for ``fault`` (see the module docstring)."""
    kind, _, n = fault.partition(":")
    if kind == "batch":
        _on_batch(int(n), signal.SIGKILL)
    elif kind == "sigterm":
        _on_batch(int(n), signal.SIGTERM)
    elif kind == "commit":
        _on_commit(int(n))
    elif kind == "saved":
        _on_saved(int(n))
    elif kind == "restore":
        _on_restore()
    elif kind == "nan":
        _on_nan(int(n))
    elif kind:
        raise flags.Error(f"unknown --fault={fault!r}")


def main(argv: list[str]) -> None:
    install(flags.FLAGS.fault)
    train.main(argv)


if __name__ == "__main__":
    train.define_flags()
    cli.run(main)

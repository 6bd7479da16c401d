"""The training loop shared by pre-training and fine-tuning (ssl_jax/loop.py): what it does at a
non-finite step under ``on_nonfinite=skip`` and ``stop``, with stand-in checkpoints and step."""

import json

import numpy as np
import pytest

from ssl_jax import parallel


class _Checkpoints:
    """What the loop needs of ``RunCheckpoints``, recording the saves."""

    directory = "CKPT"

    def __init__(self):
        self.saved = []

    def save(self, step, state, data_iter):
        self.saved.append(step)

    def latest_step(self):
        return self.saved[-1] if self.saved else None

    def reached_preemption(self, step):
        return False

    def wait(self):
        pass

    def close(self):
        pass


def _nan_at(bad_step):
    """A step that counts, with a NaN loss (and the state left alone) at ``bad_step``."""

    def step_fn(state, batch):
        bad = int(state["step"]) + 1 == bad_step
        loss = float("nan") if bad else 1.0
        new = {"step": state["step"] + 1, "nonfinite_steps": state["nonfinite_steps"] + int(bad),
               "sum": state["sum"] + (0 if bad else int(batch["label"].sum()))}
        return new, {"loss": loss, "grad_norm": 1.0, "lr": 0.1}

    return step_fn


@pytest.mark.parametrize("on_nonfinite", ["skip", "stop"])
def test_loop_skips_or_stops_at_a_nonfinite_step(on_nonfinite, tmp_path):
    from ssl_jax import faults, loop
    from ssl_jax.metrics import MetricsWriter

    batches = iter([{"image": np.zeros((8, 2, 2, 3), np.uint8),
                     "label": np.full((8,), i, np.int32)} for i in range(1, 7)])
    checkpoints = _Checkpoints()
    kwargs = dict(
        state={"step": 0, "nonfinite_steps": 0, "sum": 0}, step_fn=_nan_at(4), data_iter=batches,
        to_batch=lambda b: b, mesh=parallel.make_mesh(), checkpoints=checkpoints,
        writer=MetricsWriter(tmp_path, tensorboard=False), preemption=faults.PreemptionWatcher(),
        start_step=0, last_step=6, total_steps=6, steps_per_epoch=3, batch_size=8, log_every=1,
        checkpoint_every=2, on_nonfinite=on_nonfinite)
    if on_nonfinite == "stop":
        with pytest.raises(faults.NonFiniteError, match=r"at step 4 .*last good checkpoint is "
                           r"step 2 in CKPT"):
            loop.run_steps(**kwargs)
        assert checkpoints.saved == [2]  # none once the non-finite step happened
        return
    state = loop.run_steps(**kwargs)
    assert state["nonfinite_steps"] == 1 and state["sum"] == 8 * (1 + 2 + 3 + 5 + 6)
    assert checkpoints.saved == [2, 4, 6]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert rows[3]["loss"] == "nan" and rows[-1]["epoch"] == 2.0

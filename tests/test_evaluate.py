"""The evaluation job on a tiny finished run: restore, features, probe, kNN, eval.json."""

import json

import numpy as np
import pytest

from ssl_jax.checkpoint import WorkdirError
from ssl_jax.config import ConfigError
from ssl_jax.evaluate import __main__ as evaluate_job
from ssl_jax.evaluate import features as features_lib


def test_evaluation_job_on_tiny_checkpoint(trained_run, capsys):
    _, workdir = trained_run
    results = evaluate_job.evaluate(str(workdir), ["eval.step=3"])
    assert results["step"] == 3
    for key in ("ssl", "random_init"):
        r = results[key]
        assert r["num_train"] == 256 and r["num_test"] == 128  # runlocal subsets
        for name in ("linear_top1", "knn_top1"):  # chance: 0.1; 0.40-0.58 measured
            assert r[name] > 0.2, (key, name, r[name])
            assert abs(r[name] * 128 - round(r[name] * 128)) < 1e-6, (key, name, r[name])
    saved = json.loads((workdir / "eval.json").read_text())
    assert saved["step_3"]["ssl"] == results["ssl"]
    assert "linear top-1" in capsys.readouterr().out
    # A second evaluation of another step keeps the first one's results.
    evaluate_job.evaluate(str(workdir), [])
    saved = json.loads((workdir / "eval.json").read_text())
    assert {"step_3", "step_6", "latest"} <= set(saved)


def test_features_have_no_augmentation(trained_run):
    """Two passes over the test split give identical features (frozen, deterministic)."""
    config, workdir = trained_run
    from ssl_jax import parallel

    mesh = parallel.make_mesh()
    method, variables, _ = features_lib.restore_encoder(workdir, config, mesh)
    a, ya = features_lib.extract_features(method.encoder, variables, config, "test", mesh)
    b, yb = features_lib.extract_features(method.encoder, variables, config, "test", mesh)
    assert a.shape == (360, method.encoder.num_features)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ya, yb)
    assert set(np.unique(ya)) == set(range(10))


def test_bad_evaluation_requests(trained_run, tmp_path):
    _, workdir = trained_run
    with pytest.raises(WorkdirError, match="available steps"):
        evaluate_job.evaluate(str(workdir), ["eval.step=4"])
    with pytest.raises(ConfigError, match="eval.knn_kk"):
        evaluate_job.evaluate(str(workdir), ["eval.knn_kk=5"])
    with pytest.raises(WorkdirError, match="config.json not found"):
        evaluate_job.evaluate(str(tmp_path), [])


def test_results_survive_an_eval_json_that_cannot_be_written(trained_run, monkeypatch, caplog,
                                                              capsys):
    _, workdir = trained_run
    before = (workdir / "eval.json").read_bytes() if (workdir / "eval.json").exists() else None

    def full_disk(path, entries):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(evaluate_job.metrics, "update_results", full_disk)
    with pytest.raises(OSError, match="No space left"):
        evaluate_job.evaluate(str(workdir), ["eval.random_init_baseline=False",
                                                "eval.probe_epochs=1"])
    assert "linear top-1" in capsys.readouterr().out  # the table was printed first
    logged = caplog.text.split("this evaluation's results:", 1)[1]
    assert '"linear_top1"' in logged and '"step": 6' in logged
    after = (workdir / "eval.json").read_bytes() if (workdir / "eval.json").exists() else None
    assert after == before  # earlier results untouched

"""The papers' linear-probe protocols (ssl_jax/evaluate/protocols.py): DINO's features of the
last blocks, MAE's BatchNorm without affine parameters, and a tiny run of the job."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax.config import ConfigError
from ssl_jax.evaluate import __main__ as evaluate_job
from ssl_jax.evaluate import protocols
from ssl_jax.models import create_encoder


class _Method:  # what protocol_features needs of a method
    def __init__(self, encoder):
        self.encoder = encoder

    def encoder_input(self, x):
        return x


def test_dino_features_are_the_last_blocks_cls_tokens():
    """n blocks: the cls tokens after the final norm of blocks depth-n+1..depth, concatenated;
    the last one is the encoder's own output; avgpool adds the last block's patch mean."""
    encoder = create_encoder("vit_ti4", image_size=8, depth=3)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = encoder.init(jax.random.key(1), x, train=False)
    method = _Method(encoder)
    out = encoder.apply(variables, x, train=False)
    one = protocols.protocol_features(method, variables, x, 1, False)
    np.testing.assert_allclose(one, out, rtol=1e-5, atol=1e-6)
    two = protocols.protocol_features(method, variables, x, 2, True)
    assert two.shape == (2, 3 * encoder.dim)
    np.testing.assert_allclose(two[:, encoder.dim:2 * encoder.dim], out, rtol=1e-5, atol=1e-6)
    tokens = encoder.apply(variables, x, False, return_tokens=True)
    np.testing.assert_allclose(two[:, 2 * encoder.dim:], tokens[:, 1:].mean(axis=1), rtol=1e-5,
                               atol=1e-6)
    assert not np.allclose(two[:, :encoder.dim], out)  # block 2's cls token differs
    with pytest.raises(ValueError, match="n_last_blocks"):
        protocols.protocol_features(method, variables, x, 4, False)


def test_mae_batchnorm_without_affine_matches_numpy():
    f = jax.random.normal(jax.random.key(0), (16, 5)) * 3 + 1
    bn = {"mean": jnp.zeros(5), "var": jnp.ones(5)}
    out, new = protocols._normalise(f, bn, train=True)
    x = np.asarray(f)
    np.testing.assert_allclose(out, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-6), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(new["mean"], 0.1 * x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(new["var"], 0.9 + 0.1 * x.var(0, ddof=1), rtol=1e-5)
    test, _ = protocols._normalise(f, new, train=False)
    np.testing.assert_allclose(test, (x - np.asarray(new["mean"]))
                               / np.sqrt(np.asarray(new["var"]) + 1e-6), rtol=1e-4, atol=1e-5)
    same, none = protocols._normalise(f, None, train=True)
    assert none is None and same is f


@pytest.mark.parametrize("protocol,base_lr", [("dino", 4.0), ("mae", 1.0)])
def test_protocols_on_a_tiny_run(trained_run, protocol, base_lr, capsys):
    """Each protocol trains its probe on augmented views for two epochs of the digits and
    reports a test top-1 for the run and for the random init. DINO's SGD probe beats chance
    (0.1; 0.20-0.26 measured); MAE's LARS (trust coefficient 0.001) moves a kernel by about
    lr / 1000 of its norm a step, so its recipe needs its thousands of steps at LR 6.4: here
    only the mechanics are checked."""
    _, workdir = trained_run
    results = evaluate_job.evaluate(str(workdir), [
        f"eval.protocol={protocol}", "eval.protocol_epochs=2", "eval.protocol_batch_size=128",
        f"eval.protocol_base_lr={base_lr}", "eval.step=6"])
    for key in ("ssl", "random_init"):
        p = results[key]["protocol"]
        assert p["protocol"] == protocol and p["batch_size"] == 128
        assert p["steps"] == 2 * (1437 // 128) and np.isfinite(p["final_loss"])
        assert p["peak_lr"] == pytest.approx(base_lr * 128 / 256)
        assert 0.0 <= p["top1"] <= 1.0
    if protocol == "dino":
        assert results["ssl"]["protocol"]["top1"] > 0.15, results["ssl"]["protocol"]
    assert f"{protocol} protocol" in capsys.readouterr().out


def test_bad_protocol_is_refused(trained_run):
    _, workdir = trained_run
    with pytest.raises(ConfigError, match="eval.protocol"):
        evaluate_job.evaluate(str(workdir), ["eval.protocol=moco"])

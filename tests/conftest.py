"""Test set-up, before JAX starts: 8 forced CPU devices (for the 1-vs-N device checks), fast XLA
compile options and a persistent compilation cache shared by every pytest-xdist worker and
every subprocess a test starts (see tests/xla_env.py)."""

import os

from tests import xla_env  # the repository root is on sys.path (pyproject's pythonpath)

os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), xla_env.CPU_COMPILE_FLAGS,
    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Set in the environment, not only through jax.config: subprocesses inherit it. An explicit
# JAX_COMPILATION_CACHE_DIR in the caller's environment wins.
for _name, _value in xla_env.cache_env().items():
    os.environ.setdefault(_name, _value)

import tempfile  # noqa: E402

import pytest  # noqa: E402

# One TFDS data dir for the whole session: the digits dataset is prepared once, offline.
os.environ.setdefault("TFDS_DATA_DIR", tempfile.mkdtemp(prefix="ssl_jax_tfds_"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A finished 6-step SimCLR run (runlocal, digits): ``(config, workdir)``."""
    from configs import simclr as simclr_config
    from ssl_jax import train

    config = simclr_config.get_config("data=digits,runlocal")
    workdir = tmp_path_factory.mktemp("simclr_run")
    train.train(config, str(workdir))
    return config, workdir


@pytest.fixture(scope="session")
def tokenizer_run(tmp_path_factory):
    """A finished 6-step dVAE tokenizer run (runlocal, digits), for BEiT: its workdir."""
    from configs import dvae as dvae_config
    from ssl_jax import train

    workdir = tmp_path_factory.mktemp("tokenizer_run")
    train.train(dvae_config.get_config("data=digits,runlocal"), str(workdir))
    return str(workdir)


# The ResNet tests (test_models.py, test_resnet_init.py) run eagerly on the shapes of this one
# fixture: eager XLA ops are compiled once per shape and reused, which on CPU is much cheaper than
# compiling a jitted ResNet per test.
@pytest.fixture(scope="module")
def tiny_resnet():
    """ResNet-18 at width 1/8 with the CIFAR stem (default init 'goyal'), initialised on a
    [2, 16, 16, 3] batch: ``images(2, 16)`` and ``key()`` of test_models.py (RBG key, seed 0)."""
    import jax

    from ssl_jax.models import resnet

    rbg = jax.random.key(0, impl="rbg")
    model = resnet(18, width_multiplier=0.125, cifar_stem=True)
    return model, model.init(rbg, jax.random.normal(rbg, (2, 16, 16, 3)), train=False)

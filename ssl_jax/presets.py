"""Pieces shared by the config files in ``configs/``: the trainer's keys, the three dataset
presets and the ``runlocal`` smoke-test shrink. Each method's config file starts from
:func:`base_config` and sets its own recipe per dataset on top."""

from __future__ import annotations

from typing import Any

import ml_collections

from ssl_jax import optim
from ssl_jax.data import augment
from ssl_jax.data.sources import data_config

# Dataset presets: what the host pipeline emits and the size the model sees.
#   image_size: side of the uint8 images the pipeline decodes to (shorter side + centre crop);
#   crop_size:  side of the augmented views (and of the evaluation's centre crop).
DATASETS = {
    "digits": dict(name="digits", image_size=16, crop_size=16, num_train=1437),
    "cifar10": dict(name="cifar10", image_size=32, crop_size=32, num_train=50000),
    "imagenet2012": dict(name="imagenet2012", image_size=256, crop_size=224, num_train=1281167),
}

MODELS = {
    "resnet18": dict(name="resnet18"),
    "resnet50": dict(name="resnet50"),
    "vit_ti4": dict(name="vit_ti4"),
    "vit_s16": dict(name="vit_s16"),
    "vit_b16": dict(name="vit_b16"),
}

# Keys every model config carries, so that any of them can be overridden from the command line.
# dtype is the compute dtype of the encoder and the method's heads ('float32' or 'bfloat16'):
# parameters, optimizer state, norms' statistics, softmaxes and losses stay float32.
MODEL_DEFAULTS = {
    "resnet": dict(width_multiplier=1.0, cifar_stem=False, dtype="float32"),
    "vit": dict(pos_embed="learned", drop_path_rate=0.0, dtype="float32"),
}


def base_config(method: str, data: str) -> ml_collections.ConfigDict:
    """The trainer's keys with defaults, for ``method`` on dataset preset ``data``."""
    if data not in DATASETS:
        from ssl_jax.config import ConfigError

        raise ConfigError(f"unknown data={data!r}; choose one of {', '.join(DATASETS)}")
    preset = DATASETS[data]
    config = ml_collections.ConfigDict()
    config.method = method
    config.seed = 0
    config.batch_size = 256
    config.num_epochs = 100.0
    config.total_steps = 0  # > 0 overrides num_epochs
    config.log_every = 50
    config.on_nonfinite = "skip"  # or 'stop'
    config.checkpoint = dict(every_steps=1000, keep=3, keep_every=0, async_save=True)
    config.mesh = dict(fsdp=1)
    config.sharding_rules = ((".*", "replicate"),)
    config.data = data_config(name=preset["name"], image_size=preset["image_size"])
    crop = preset["crop_size"]
    config.aug = dict(view1=augment.view_config(size=crop), view2=augment.view_config(size=crop))
    config.optim = optim.optim_config()
    config.eval = eval_config()
    if data == "imagenet2012":  # the run cadence of a large dataset, whatever the method
        config.log_every = 100
        config.checkpoint.update(every_steps=2500, keep_every=25000)
        config.eval.batch_size = 1024
        config.data.num_workers = 16
    return config


def eval_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Keys of the evaluation job (``python -m ssl_jax.evaluate``), stored with the run."""
    cfg = ml_collections.ConfigDict(
        dict(
            step=-1,  # checkpoint step to evaluate; -1: the latest
            batch_size=256,  # feature-extraction batch (global)
            knn_k=20,
            knn_temperature=0.07,
            probe_normalize="standardize",  # 'standardize' | 'batchnorm' | 'none'
            probe_epochs=100,
            probe_val_fraction=0.1,
            label_fraction=1.0,
            max_train_examples=0,  # 0: the whole split
            max_test_examples=0,
            random_init_baseline=True,
            attention_images=4,  # ViT encoders: cls attention maps of this many test images
        )
    )
    cfg.update(overrides)
    return cfg


def set_model(config: ml_collections.ConfigDict, name: str, **kwargs: Any) -> None:
    """Sets ``config.model`` to the named encoder with its keyword arguments."""
    if name not in MODELS and not name.startswith(("resnet", "vit_")):
        from ssl_jax.config import ConfigError

        raise ConfigError(f"unknown model={name!r}; e.g. {', '.join(MODELS)}")
    family = MODEL_DEFAULTS["resnet" if name.startswith("resnet") else "vit"]
    config.model = dict(name=name, **{**family, **kwargs})


def shrink_for_runlocal(config: ml_collections.ConfigDict) -> None:
    """A smoke test of well under two minutes on 2 CPU cores: a few steps of a tiny model,
    checkpoints included, on small evaluation subsets."""
    config.batch_size = 16
    config.total_steps = 6
    config.log_every = 2
    config.checkpoint.every_steps = 3
    config.checkpoint.async_save = False
    config.optim.warmup_epochs = 0.0
    config.eval.batch_size = 64
    config.eval.max_train_examples = 256
    config.eval.max_test_examples = 128
    config.eval.probe_epochs = 10
    name = config.model.name
    if name.startswith("resnet"):
        set_model(config, "resnet18", width_multiplier=0.125, cifar_stem=True)
    else:
        patch = 4 if config.aug.view1.size % 4 == 0 else 2
        set_model(config, f"vit_ti{patch}", depth=2)
    config.data.image_size = min(config.data.image_size, 32)
    for view in (config.aug.view1, config.aug.view2):
        view.size = min(view.size, 16)

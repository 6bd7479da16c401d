"""Pieces shared by the config files in ``configs/``: the trainer's keys, the three dataset
presets, the ``runlocal`` smoke-test shrink, and the default blocks of the optimizer
(:func:`optim_config`), an augmented view (:func:`view_config`, :func:`dino_view`), the data
pipeline (:func:`data_config`) and the evaluation job (:func:`eval_config`). Each method's config
file starts from :func:`base_config` and sets its own recipe per dataset on top.

This module imports no JAX, Flax or TFDS (a test checks it), so that a config file builds on any
host in milliseconds; the layers that run the configs (``optim``, ``data.augment``,
``data.sources``, ``data.multicrop``) import their defaults from here.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
from ml_collections import config_dict

from ssl_jax.config import ConfigError

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
    "resnet": dict(width_multiplier=1.0, cifar_stem=False, dtype="float32", init_scheme="goyal"),
    "vit": dict(pos_embed="learned", drop_path_rate=0.0, dtype="float32", init_scheme="mae"),
}
# init_scheme: a ResNet's initial weights ('goyal', 'torchvision', 'pytorch': models/resnet.py);
# for a ViT the paper whose initial weights its recipe follows ('mae': xavier-uniform,
# 'dino': normal(0.02), 'beit': DINO's then fix_init_weight); see ssl_jax/models/vit_init.py.


def base_config(method: str, data: str) -> ml_collections.ConfigDict:
    """The trainer's keys with defaults, for ``method`` on dataset preset ``data``."""
    if data not in DATASETS:
        raise ConfigError(f"unknown data={data!r}; choose one of {', '.join(DATASETS)}")
    preset = DATASETS[data]
    config = ml_collections.ConfigDict()
    config.method = method
    config.seed = 0
    config.batch_size = 256
    config.num_epochs = 100.0
    config.total_steps = 0  # > 0 overrides num_epochs
    # A weights file or run directory the new run starts from (docs/weights.md); '' for none.
    config.init_from = ""
    config.log_every = 50
    config.on_nonfinite = "skip"  # or 'stop'
    config.checkpoint = dict(every_steps=1000, keep=3, keep_every=0, async_save=True)
    config.mesh = dict(fsdp=1)
    config.sharding_rules = ((".*", "replicate"),)
    config.data = data_config(name=preset["name"], image_size=preset["image_size"])
    crop = preset["crop_size"]
    config.aug = dict(view1=view_config(size=crop), view2=view_config(size=crop))
    config.optim = optim_config()
    config.eval = eval_config()
    # The online linear probe (ssl_jax/online_probe.py): off, as it costs more than 5% of a step.
    config.online_probe = dict(enabled=False, base_lr=0.1, num_classes=0)
    if data == "imagenet2012":  # the run cadence of a large dataset, whatever the method
        config.data.train_region = "whole"  # crops from the whole image, as torchvision's
        config.log_every = 100
        config.checkpoint.update(every_steps=2500, keep_every=25000)
        config.eval.batch_size = 1024
        config.eval.kmeans_n_init = 1  # 1000 clusters of 50,000 test features
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
            protocol="fast",  # 'fast' | 'dino' | 'mae': see ssl_jax/evaluate/protocols.py
            protocol_epochs=0,  # > 0 replaces the protocol's epochs (dino 100, mae 90)
            protocol_batch_size=0,  # > 0 replaces its batch (dino 1024, mae 16384)
            protocol_base_lr=0.0,  # > 0 replaces its base LR (x B/256; dino 1e-3, mae 0.1)
            n_last_blocks=0,  # > 0 replaces the ViT blocks whose cls tokens are concatenated
            avgpool_patchtokens=False,  # 'dino': also the last block's mean patch token
            kmeans=True,  # k-means on the test features: NMI, ARI, cluster accuracy
            kmeans_k=0,  # clusters; 0: the number of classes
            kmeans_n_init=10,  # k-means restarts (the best inertia kept)
            tsne_points=1000,  # test points in the t-SNE picture (0: no picture)
            tsne_perplexity=30.0,
            data="",  # '': the run's dataset; else transfer: e.g. 'digits', 'cifar10', 'folder'
            data_root="",  # the image folder of eval.data ('folder', or a dataset stored so)
            export_features="",  # a .npz path: the train/test features and labels are saved
            export_overwrite=False,  # replace an existing export_features file
        )
    )
    cfg.update(overrides)
    return cfg


def set_model(config: ml_collections.ConfigDict, name: str, **kwargs: Any) -> None:
    """Sets ``config.model`` to the named encoder with its keyword arguments."""
    if name not in MODELS and not name.startswith(("resnet", "vit_")):
        raise ConfigError(f"unknown model={name!r}; e.g. {', '.join(MODELS)}")
    family = MODEL_DEFAULTS["resnet" if name.startswith("resnet") else "vit"]
    config.model = dict(name=name, **{**family, **kwargs})


def set_encoder(config: ml_collections.ConfigDict, name: str, resnet: dict | None = None,
                vit: dict | None = None) -> None:
    """:func:`set_model` with the keyword arguments of the encoder's family: ``resnet`` for a
    ResNet, ``vit`` for a ViT (a preset whose default backbone is a ResNet may be run with
    ``model=vit_...``)."""
    set_model(config, name, **((resnet if name.startswith("resnet") else vit) or {}))


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
    config.eval.kmeans_n_init = 2
    config.eval.tsne_points = 64
    config.eval.tsne_perplexity = 10.0
    name = config.model.name
    if name.startswith("resnet"):
        set_model(config, "resnet18", width_multiplier=0.125, cifar_stem=True,
                  init_scheme=config.model.get("init_scheme", "goyal"))
    else:
        patch = 4 if config.aug.view1.size % 4 == 0 else 2
        set_model(config, f"vit_ti{patch}", depth=2,
                  init_scheme=config.model.get("init_scheme", "mae"))
    config.data.image_size = min(config.data.image_size, 32)
    for view in (config.aug.view1, config.aug.view2):
        view.size = min(view.size, 16)


# --- Default blocks (moved here from optim.py, data/augment.py, data/sources.py, multicrop.py) ---


def optim_config(**overrides: Any) -> ml_collections.ConfigDict:
    """``config.optim`` with SimCLR's LARS recipe as defaults; config files override what their
    method needs (``ssl_jax.optim`` builds the optimizer from it)."""
    cfg = ml_collections.ConfigDict(
        dict(
            name="lars",
            base_lr=0.3,
            lr_scaling="linear",
            warmup_epochs=10.0,
            end_lr_factor=0.0,
            weight_decay=1e-6,
            momentum=0.9,
            b1=0.9,
            b2=0.999,
            grad_clip_norm=0.0,
            grad_clip_kind="global",
            weight_decay_end=0.0,
            decay_all=False,
            freeze=(),
        )
    )
    cfg.update(overrides)
    return cfg


def data_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The `config.data` block with its defaults, updated by `overrides`.

    Keys: name, source ('auto' | 'builtin' | 'tfds' | 'folder'), root (image-folder root),
    data_dir (TFDS data dir, '' for the default), image_size (side of the square uint8
    images the pipeline emits), train_split, test_split, num_workers (Grain worker
    processes, 0 = in-process), prefetch (batches buffered per worker), read_threads (Grain's
    reading threads per process or worker: many for remote storage, few on a small CPU host),
    train_region ('square': training images are the centre square, as evaluation's; 'whole':
    the whole image, its shorter side at image_size, on a padded canvas with its size in the
    batch's 'image_hw' field, so that random crops sample all of it as torchvision's do),
    max_aspect (with 'whole': the longer side kept is at most this times the shorter; the
    canvas side is ceil(image_size * max_aspect)).
    """
    cfg = ml_collections.ConfigDict(
        {
            "name": "digits",
            "source": "auto",
            "root": "",
            "data_dir": "",
            "image_size": 32,
            "train_split": "train",
            "test_split": "test",
            "num_workers": 0,
            "prefetch": 2,
            "read_threads": 16,
            "train_region": "square",
            "max_aspect": 4 / 3,
        }
    )
    for key, value in overrides.items():
        if key not in cfg:
            raise ConfigError(f"unknown data config key {key!r}; known keys: {', '.join(cfg)}")
        cfg[key] = value
    return cfg


VIEW_REQUIRED_KEYS = tuple(
    "size crop_scale crop_ratio flip color_jitter color_jitter_p grayscale_p blur_p blur_sigma "
    "solarize_p".split()
)
# Optional keys: a view saved before they existed means their old behaviour.
VIEW_OPTIONAL_KEYS = {"blur_kernel": "simclr"}
# The Gaussian blur's kernel, by the paper whose code the recipe follows:
#   'simclr': SimCLR's (and BYOL's) odd kernel of 10% of the view's side, at least 3 taps;
#   'pil':    PIL's ImageFilter.GaussianBlur (DINO, MoCo v2): no cap, the Gaussian's support
#             out to 3 sigma_max (radius ceil(3 * blur_sigma[1]), below the view's side).
BLUR_KERNELS = ("simclr", "pil")
JITTER_KEYS = ("brightness", "contrast", "saturation", "hue")
_PROBABILITY_KEYS = ("color_jitter_p", "grayscale_p", "blur_p", "solarize_p")


def view_config(**overrides: Any) -> ml_collections.ConfigDict:
    """SimCLR's ImageNet view recipe; keyword overrides replace defaults and are validated.

    Keys: `size`, `crop_scale`, `crop_ratio`, `flip`, `color_jitter` (strength s, 0 disables),
    `color_jitter_p`, `brightness`/`contrast`/`saturation`/`hue` (None: derived from s),
    `grayscale_p`, `blur_p`, `blur_sigma`, `blur_kernel` (:data:`BLUR_KERNELS`), `solarize_p`.
    """
    cfg = ml_collections.ConfigDict(
        dict(
            size=224,
            crop_scale=(0.08, 1.0),
            crop_ratio=(3 / 4, 4 / 3),
            flip=True,
            color_jitter=1.0,
            color_jitter_p=0.8,
            brightness=config_dict.placeholder(float),
            contrast=config_dict.placeholder(float),
            saturation=config_dict.placeholder(float),
            hue=config_dict.placeholder(float),
            grayscale_p=0.2,
            blur_p=0.5,
            blur_sigma=(0.1, 2.0),
            blur_kernel="simclr",
            solarize_p=0.0,
        )
    )
    unknown = sorted(set(overrides) - set(cfg.keys()))
    if unknown:
        raise ValueError(
            f"unknown augmentation key(s) {unknown}; known keys: {sorted(cfg.keys())}."
        )
    for name, value in overrides.items():
        try:
            cfg[name] = value
        except TypeError as e:
            raise ValueError(f"augmentation key {name}={value!r} has the wrong type: {e}") from e
    validate_view_config(cfg)
    return cfg


def dino_view(**overrides: Any) -> ml_collections.ConfigDict:
    """A DINO view config: :func:`view_config` with DINO's colour jitter (brightness 0.4,
    contrast 0.4, saturation 0.2, hue 0.1, p=0.8), grayscale p=0.2, flip and PIL's uncapped
    blur; ``overrides`` set size, crop scale, blur and solarize probabilities."""
    base = dict(color_jitter=1.0, color_jitter_p=0.8, brightness=0.4, contrast=0.4,
                saturation=0.2, hue=0.1, grayscale_p=0.2, flip=True, solarize_p=0.0,
                blur_kernel="pil")
    return view_config(**{**base, **overrides})


def dino_multicrop(global_size: int, global_scale: tuple[float, float], local_size: int,
                   local_scale: tuple[float, float], num_local: int) -> dict[str, Any]:
    """``config.aug`` of DINO's multi-crop (and iBOT's): 2 global crops (the first always
    blurred, the second blurred with p=0.1 and solarized with p=0.2) and ``num_local`` local
    crops (blurred with p=0.5), all :func:`dino_view`."""
    return dict(
        num_global_crops=2,
        num_local_crops=num_local,
        view1=dino_view(size=global_size, crop_scale=global_scale, blur_p=1.0),
        view2=dino_view(size=global_size, crop_scale=global_scale, blur_p=0.1, solarize_p=0.2),
        local=dino_view(size=local_size, crop_scale=local_scale, blur_p=0.5),
    )


def dino_digits_views(aug: ml_collections.ConfigDict) -> None:
    """DINO's views on the built-in digits (measured: colour, blur and solarize made every run
    collapse on the tiny grey images): no colour jitter, grayscale, blur, solarize or flip;
    global crops of scale 0.7-1, local crops of 0.3-0.6."""
    for view in (aug.view1, aug.view2, aug.local):
        view.update(color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, flip=False)
    for view in (aug.view1, aug.view2):
        view.crop_scale = (0.7, 1.0)
    aug.local.crop_scale = (0.3, 0.6)


def lightly_cifar10_view(**overrides: Any) -> ml_collections.ConfigDict:
    """The views of lightly's CIFAR-10 benchmark (``SimCLRCollateFunction(input_size=32,
    gaussian_blur=0.)``: crop scale 0.08-1, colour jitter 0.7/0.7/0.7/0.2 with p=0.8, grayscale
    p=0.2, flip, no blur), the same for both views; BYOL's and MoCo v2's CIFAR-10 presets."""
    base = dict(size=32, crop_scale=(0.08, 1.0), color_jitter=1.0, color_jitter_p=0.8,
                brightness=0.7, contrast=0.7, saturation=0.7, hue=0.2, grayscale_p=0.2,
                flip=True, blur_p=0.0, solarize_p=0.0)
    return view_config(**{**base, **overrides})


def check_range(name: str, value: Any, high: float = math.inf) -> None:
    """Checks `value` is a pair (lo, hi) with 0 < lo <= hi <= high."""
    pair = isinstance(value, (tuple, list)) and len(value) == 2
    if not pair or not 0.0 < value[0] <= value[1] <= high:
        raise ValueError(f"{name}={value!r}: pass a pair (lo, hi) with 0 < lo <= hi <= {high}.")


def validate_view_config(cfg: Any) -> None:
    """Raises ValueError naming the key of `cfg` that is unknown, missing or out of range."""
    keys = list(cfg.keys()) if hasattr(cfg, "keys") else list(vars(cfg))
    known = set(VIEW_REQUIRED_KEYS) | set(JITTER_KEYS) | set(VIEW_OPTIONAL_KEYS)
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"unknown augmentation key(s) {unknown}; known keys: {sorted(known)}.")
    missing = [k for k in VIEW_REQUIRED_KEYS if k not in keys]
    if missing:
        raise ValueError(
            f"augmentation config lacks key(s) {missing}; start from presets.view_config()."
        )

    def fail(name: str, why: str) -> None:
        raise ValueError(f"augmentation key {name}={getattr(cfg, name)!r}: {why}")

    def number(name: str) -> bool:
        value = getattr(cfg, name, None)
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not isinstance(cfg.size, int) or cfg.size <= 0:
        fail("size", "must be a positive int (output side in pixels).")
    for name, high in (("crop_scale", 1.0), ("crop_ratio", math.inf), ("blur_sigma", math.inf)):
        check_range(f"augmentation key {name}", getattr(cfg, name), high)
    for name in _PROBABILITY_KEYS:
        if not number(name) or not 0.0 <= getattr(cfg, name) <= 1.0:
            fail(name, "must be a probability in [0, 1].")
    if not isinstance(cfg.flip, bool):
        fail("flip", "must be True or False.")
    if getattr(cfg, "blur_kernel", VIEW_OPTIONAL_KEYS["blur_kernel"]) not in BLUR_KERNELS:
        fail("blur_kernel", f"must be one of {BLUR_KERNELS} (SimCLR's 10%-of-side kernel or "
             "PIL's uncapped Gaussian, as DINO).")
    if not number("color_jitter") or cfg.color_jitter < 0:
        fail("color_jitter", "must be a strength >= 0 (0 disables colour jitter).")
    for name in JITTER_KEYS:
        if getattr(cfg, name, None) is None:
            continue
        value = getattr(cfg, name)
        if not number(name) or value < 0 or (name == "hue" and value > 0.5):
            fail(name, "must be >= 0 (hue at most 0.5) or None to derive it from color_jitter.")
        if cfg.color_jitter == 0 and value > 0:
            fail(name, "is set but color_jitter=0 disables colour jitter; set color_jitter > 0.")

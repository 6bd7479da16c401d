r"""End-to-end fine-tuning of a pre-trained encoder (any method) with a linear classifier.

    python -m ssl_jax.finetune --workdir RUN                      # the recipe of RUN's dataset
    python -m ssl_jax.finetune --workdir RUN --config configs/finetune.py:data=digits \
        --config.label_fraction=0.1 [--config.from_scratch=True]

The job finds this file in the package (an installed ``ssl_jax`` has no ``configs/`` folder);
``configs/finetune.py`` re-exports it for ``--config configs/finetune.py:ARG``.

This config holds the fine-tuning's own keys. The job adds the run's ``model``, ``data``,
``mesh`` and ``sharding_rules`` from ``RUN/config.json`` before applying ``--config.KEY=VALUE``
overrides, so ``--config.data.root=...`` works when the data moved, and a changed
``--config.model.*`` is refused (the encoder is restored as it was pre-trained).

Presets (``arg``): ``data=digits|cifar10|imagenet2012`` (the recipe; without ``--config`` the job
picks the run's dataset), ``method=NAME`` (the pre-training method: ``beit`` selects BEiT's
fine-tuning recipe, every other method MAE's; without ``--config`` the job picks the run's),
``vit=b|l|h`` (the ImageNet recipe of that ViT size), ``runlocal`` (a smoke test of a few steps).

Recipes:
- imagenet2012: MAE's end-to-end fine-tuning (He et al. 2022, Table 9 and the code's
  FINETUNE.md), ViT-B: batch 1024, AdamW (0.9, 0.999) with base LR 5e-4 x B/256, layer-wise LR
  decay 0.65, weight decay 0.05, 100 epochs with 5 warm-up then cosine, drop path 0.1, label
  smoothing 0.1, mixup 0.8, cutmix 1.0 (switch 0.5), random resized crop + flip, global average
  pool + LayerNorm, min LR 1e-6. ``vit=l``: base LR 1e-3, layer decay 0.75, 50 epochs, drop
  path 0.2; ``vit=h``: the same with drop path 0.3. Not implemented: RandAugment (9, 0.5) and
  random erasing 0.25 of MAE's recipe.
- imagenet2012, ``method=beit``: BEiT's (its README's fine-tuning commands and
  ``run_class_finetuning.py``), whose ``--lr`` is used as typed at batch 1024: ViT-B LR 4e-3
  (base 1e-3 x B/256), 20 warm-up epochs of 100, layer decay 0.65, drop path 0.1; ``vit=l``:
  LR 1e-3 (base 2.5e-4), 5 warm-up of 50, layer decay 0.75, drop path 0.2. The rest as MAE's.
  On cifar10 and digits, ``method=beit`` keeps the dataset's recipe with BEiT's layer decay
  0.65 and a fifth of the epochs as warm-up (its 20 of 100).
- cifar10: scaled down for small machines (not tuned): batch 256, base LR 1e-3, layer decay
  0.65, 20 epochs with 2 warm-up, drop path 0.1, label smoothing 0.1, mixup 0.8, cutmix 1.0.
- digits: the built-in data, about a minute on 2 CPU cores: batch 128, base LR 8e-3 (4e-3 at
  B=128), layer decay 0.75, 30 epochs (330 steps) with 3 warm-up, crops of scale 0.6-1, weak
  mixing (mixup 0.2, cutmix 0.5, on half of the batches), label smoothing 0.1.

``drop_path_rate`` applies to ViTs (ResNets have no stochastic depth; the job says so in its log).
``layer_decay`` of a ResNet scales by stage: stem, each stage, classifier.
"""

import ml_collections

from ssl_jax import presets
from ssl_jax.config import ConfigError, parse_arg

VIT_SIZES = {  # MAE's fine-tuning per ViT size
    "b": dict(base_lr=5e-4, layer_decay=0.65, num_epochs=100.0, drop_path_rate=0.1),
    "l": dict(base_lr=1e-3, layer_decay=0.75, num_epochs=50.0, drop_path_rate=0.2),
    "h": dict(base_lr=1e-3, layer_decay=0.75, num_epochs=50.0, drop_path_rate=0.3),
}
BEIT_VIT_SIZES = {  # BEiT's README: --lr 4e-3 (B), 1e-3 (L) at batch 1024, as typed
    "b": dict(base_lr=1e-3, layer_decay=0.65, num_epochs=100.0, drop_path_rate=0.1,
              warmup_epochs=20.0),
    "l": dict(base_lr=2.5e-4, layer_decay=0.75, num_epochs=50.0, drop_path_rate=0.2,
              warmup_epochs=5.0),
}
MIN_LR = 1e-6  # MAE's and BEiT's fine-tuning: cosine to 1e-6


def get_config(arg=None):
    arg = parse_arg(arg, data="digits", method="mae", vit="b", runlocal=False)
    if arg.data not in ("digits", "cifar10", "imagenet2012"):
        raise ConfigError(f"unknown data={arg.data!r}; choose digits, cifar10 or imagenet2012")
    config = _base(arg.data, arg.method)
    beit = arg.method == "beit"

    if arg.data == "imagenet2012":
        sizes = BEIT_VIT_SIZES if beit else VIT_SIZES
        if arg.vit not in sizes:
            raise ConfigError(f"unknown vit={arg.vit!r} for the {'BEiT' if beit else 'MAE'} "
                              f"fine-tuning recipe; choose one of {', '.join(sizes)}")
        size = sizes[arg.vit]
        config.batch_size = 1024
        config.num_epochs = size["num_epochs"]
        config.log_every = 100
        config.drop_path_rate = size["drop_path_rate"]
        config.optim.update(base_lr=size["base_lr"], layer_decay=size["layer_decay"],
                            warmup_epochs=size.get("warmup_epochs", 5.0),
                            end_lr_factor=MIN_LR / (size["base_lr"] * config.batch_size / 256))
        config.eval_batch_size = 1024
    elif arg.data == "cifar10":
        config.batch_size = 256
        config.num_epochs = 20.0
        config.log_every = 50
        config.optim.update(base_lr=1e-3, layer_decay=0.65, warmup_epochs=2.0)
        config.eval_batch_size = 512
    else:  # digits
        config.batch_size = 128
        config.num_epochs = 30.0
        config.log_every = 30
        config.checkpoint.every_steps = 100
        config.aug.crop_scale = (0.6, 1.0)
        config.mixup.update(mixup_alpha=0.2, cutmix_alpha=0.5, prob=0.5)
        config.optim.update(base_lr=8e-3, layer_decay=0.75, warmup_epochs=3.0)
        config.eval_batch_size = 120
    if beit and arg.data != "imagenet2012":
        config.optim.update(layer_decay=0.65, warmup_epochs=config.num_epochs / 5)

    if arg.runlocal:
        config.batch_size = 32
        config.total_steps = 6
        config.log_every = 2
        config.checkpoint.update(every_steps=3, async_save=False)
        config.optim.warmup_epochs = 0.0
        config.eval_batch_size = 64
    config.lock()
    return config


def _base(data, method):
    config = ml_collections.ConfigDict()
    config.recipe = data  # the dataset this recipe is for (the job warns on another one)
    config.recipe_method = method  # the pre-training method whose fine-tuning recipe this is
    config.step = -1  # checkpoint step to fine-tune; -1: the latest
    config.from_scratch = False  # True: a random init of the same encoder (the baseline)
    config.label_fraction = 1.0  # class-balanced share of the training labels, in (0, 1]
    config.seed = 0  # the label subset, data order, initialisation and augmentation
    config.batch_size = 1024
    config.num_epochs = 100.0  # epochs over the labelled examples
    config.total_steps = 0  # > 0 overrides num_epochs
    config.log_every = 100
    config.image_size = 0  # crop side; 0: the size the encoder was pre-trained at
    config.pool = "gap"  # 'gap' (mean of patch tokens + LayerNorm, MAE) or 'cls' (ViT cls token)
    config.drop_path_rate = 0.1  # stochastic depth of the last ViT block (linear from 0)
    config.label_smoothing = 0.1
    config.mixup = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)
    config.aug = dict(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True)
    config.optim = presets.optim_config(
        name="adamw", base_lr=5e-4, lr_scaling="linear", warmup_epochs=5.0, end_lr_factor=0.0,
        weight_decay=0.05, b1=0.9, b2=0.999, layer_decay=0.65)
    config.eval_batch_size = 1024  # test-set batch (global)
    # The fine-tuning's own checkpoints in RUN/finetune/<name>/checkpoints (as pre-training's).
    config.checkpoint = dict(every_steps=1000, keep=2, keep_every=0, async_save=True)
    config.on_nonfinite = "skip"  # or 'stop': exit code 4 at a NaN/Inf loss or gradient
    return config

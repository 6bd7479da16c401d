r"""DINO (Caron et al. 2021): self-distillation with an EMA teacher, centring and sharpening.

    python -m ssl_jax.train --config configs/dino.py:data=digits --workdir /tmp/dino
    python -m ssl_jax.train --config configs/dino.py:data=cifar10 --workdir /tmp/dino_c10 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10
    python -m ssl_jax.train --config configs/dino.py:data=imagenet2012 ...

Presets (``arg``): ``data=digits|cifar10|imagenet2012``, ``model=vit_s16|vit_ti4|resnet50|...``
(default per dataset), ``local_crops=N`` (default per dataset; 0 disables multi-crop and widens
the global crops' scale to 0.14-1, as DINO recommends), ``runlocal`` (a smoke test of a few steps).
Overriding ``--config.aug.num_local_crops`` alone keeps the crop scales as they are.

Recipes (common to all: global crop 1 blurred always, global crop 2 blurred with p=0.1 and
solarized with p=0.2, local crops blurred with p=0.5, colour jitter 0.4/0.4/0.2/0.1 with p=0.8,
grayscale p=0.2, flip; student temperature 0.1, teacher temperature 0.04 -> 0.07, centre
momentum 0.9, teacher momentum 0.996 -> 1 (cosine), AdamW with LR 0.0005 x B/256 after a linear
warm-up then cosine, weight decay 0.04 -> 0.4 (cosine), per-parameter gradient clipping at 3.0,
the head's last layer frozen in the first epoch, stochastic depth 0.1):
- imagenet2012: the paper's ViT-S/16 recipe: batch 1024, 100 epochs (the paper runs 100-800),
  2 global crops of 224 px (scale 0.4-1) and 10 local crops of 96 px (scale 0.05-0.4), K=65536,
  head 2048-2048-256, 10 warm-up epochs, minimum LR 1e-6, teacher-temperature warm-up over 30
  epochs.
- cifar10: ViT-Ti width at patch 4 with 6 blocks (192 wide, 3 heads; an 8x8 grid on 32-px
  global crops, 4x4 on 16-px local crops; ``model=vit_ti4`` for all 12 blocks), 6 local crops,
  batch 256, 200 epochs, K=4096, head 1024-1024-256, 10 warm-up epochs, teacher-temperature
  warm-up over 30 epochs: the recipe for an accelerator (the CPU figures in docs/benchmarks.md
  are from a short run with its own overrides).
- digits: the built-in 16-px digits (8x8 digits upscaled), sized for about 5 minutes on 2 CPU
  cores. Default backbone: the narrow CIFAR-style ResNet-18 (width 0.25) of the SimCLR digits
  preset, with BatchNorm in the head (DINO's ``use_bn_in_head``); batch 64, 15 epochs (330
  steps), 2 global crops of scale 0.7-1 without colour jitter, grayscale, blur, solarize or flip,
  no local crops (``local_crops=N`` adds 8-px crops of scale 0.3-0.6), K=1024, head 512-512-128,
  teacher temperature 0.04 throughout, teacher momentum 0.99 -> 1, LR 0.002 x B/256 with 2
  warm-up epochs. Why it departs from the paper's views: on these tiny grey images DINO's colour
  jitter (and blur/solarize) dominates what a random network sees, and every run with it
  collapsed to the uniform distribution (teacher entropy -> log K within ~100 steps, for ViT and
  ResNet backbones, teacher temperatures 0.01-0.04, K up to 8192, fixed prototypes); with
  identical views the teacher sharpens, with crops-only views it does not collapse.
  ``model=vit_ti4`` (ViT-Ti width, 4 blocks, patch 4) trains without collapse on these views but
  its features stay below the random-init ViT's (measured in docs/benchmarks.md).
"""

from ssl_jax import presets
from ssl_jax.data.multicrop import dino_view
from ssl_jax.methods.dino import dino_config

DATA = {  # global size, local size, local crops, model, batch, epochs
    "imagenet2012": (224, 96, 10, "vit_s16", 1024, 100.0),
    "cifar10": (32, 16, 6, "vit_ti4", 256, 200.0),
    "digits": (16, 8, 0, "resnet18", 64, 15.0),
}


def _set_model(config, name, **vit_kwargs):
    """ViT options (stochastic depth, depth) for ViTs; a ResNet gets the CIFAR stem on small
    images instead."""
    if name.startswith("vit"):
        presets.set_model(config, name, **vit_kwargs)
    else:
        presets.set_model(config, name, cifar_stem=config.aug.view1.size <= 64)


def get_config(arg=None):
    from ssl_jax.config import parse_arg

    arg = parse_arg(arg, data="digits", model="", local_crops=-1, runlocal=False)
    config = presets.base_config("dino", arg.data)
    global_size, local_size, num_local, model, batch, epochs = DATA[arg.data]
    num_local = num_local if arg.local_crops < 0 else arg.local_crops
    global_scale = (0.4, 1.0) if num_local else (0.14, 1.0)
    config.aug = dict(
        num_global_crops=2,
        num_local_crops=num_local,
        view1=dino_view(size=global_size, crop_scale=global_scale, blur_p=1.0),
        view2=dino_view(size=global_size, crop_scale=global_scale, blur_p=0.1, solarize_p=0.2),
        local=dino_view(size=local_size, crop_scale=(0.05, 0.4), blur_p=0.5),
    )
    config.dino = dino_config()
    config.batch_size = batch
    config.num_epochs = epochs
    config.optim.update(
        name="adamw", base_lr=0.0005, lr_scaling="linear", warmup_epochs=10.0, b1=0.9, b2=0.999,
        weight_decay=0.04, weight_decay_end=0.4, grad_clip_norm=3.0,
        grad_clip_kind="per_parameter", freeze=(("head/last_layer", 1.0),))

    if arg.data == "imagenet2012":
        _set_model(config, arg.model or model, drop_path_rate=0.1)
        config.optim.end_lr_factor = 1e-6 / (0.0005 * batch / 256)
    elif arg.data == "cifar10":  # CPU-sized depth, as MAE's CIFAR-10 preset (model=vit_ti4: 12)
        vit_kw = {} if arg.model else {"depth": 6}
        _set_model(config, arg.model or model, drop_path_rate=0.1, **vit_kw)
        config.dino.update(out_dim=4096, hidden_dim=1024)
        config.data.num_workers = 2
    else:  # digits
        name = arg.model or model
        if name.startswith("vit"):
            _set_model(config, name, drop_path_rate=0.1, depth=4)
        else:
            presets.set_model(config, name, cifar_stem=True, width_multiplier=0.25)
        for view in (config.aug.view1, config.aug.view2, config.aug.local):
            view.update(color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0,
                        flip=False)
        for view in (config.aug.view1, config.aug.view2):
            view.crop_scale = (0.7, 1.0)
        config.aug.local.crop_scale = (0.3, 0.6)
        config.dino.update(out_dim=1024, hidden_dim=512, bottleneck_dim=128, head_bn=True,
                           warmup_teacher_temp=0.04, teacher_temp=0.04,
                           warmup_teacher_temp_epochs=0.0, momentum_teacher=0.99)
        config.optim.update(base_lr=0.002, warmup_epochs=2.0)
        config.log_every = 10
        config.checkpoint.every_steps = 100

    if arg.runlocal:
        presets.shrink_for_runlocal(config)
        config.aug.local.size = min(config.aug.local.size, 8)
        config.aug.num_local_crops = min(config.aug.num_local_crops, 2)
        config.dino.update(out_dim=64, hidden_dim=64, bottleneck_dim=32,
                           warmup_teacher_temp_epochs=0.0)
        config.optim.freeze = (("head/last_layer", 0.0),)
    config.lock()
    return config

r"""DINO (Caron et al. 2021): self-distillation with an EMA teacher, centring and sharpening.

    python -m ssl_jax.train --config configs/dino.py:data=digits --workdir /tmp/dino
    python -m ssl_jax.train --config configs/dino.py:data=cifar10 --workdir /tmp/dino_c10 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10
    python -m ssl_jax.train --config configs/dino.py:data=imagenet2012 ...

Presets (``arg``): ``data=digits|cifar10|imagenet2012``, ``model=vit_s16|vit_ti4|resnet50|...``
(default per dataset), ``local_crops=N`` (default per dataset; 0 disables multi-crop and widens
the global crops' scale to 0.14-1, as DINO recommends), ``runlocal`` (a smoke test of a few steps).
Overriding ``--config.aug.num_local_crops`` alone keeps the crop scales as they are.

Recipes (the details and why: docs/recipes.md, "DINO"):
- data=imagenet2012: the README's full ViT-S/16 command (batch 1024, 2x224 + 8x96 px crops, 300
  epochs, teacher T 0.04 -> 0.07, norm_last_layer False); model=resnet50: its ResNet-50 command.
- data=cifar10: a 6-block ViT-Ti/4 with 6 local crops, 200 epochs: a recipe for an accelerator.
- data=digits: a narrow ResNet-18 on crops-only views, no local crops, ~5 min on 2 CPU cores.
"""

from ssl_jax import presets

DATA = {
    "imagenet2012": dict(global_size=224, local_size=96, local_crops=8, model="vit_s16",
                         batch_size=1024, num_epochs=300.0),
    "cifar10": dict(global_size=32, local_size=16, local_crops=6, model="vit_ti4",
                    batch_size=256, num_epochs=200.0),
    "digits": dict(global_size=16, local_size=8, local_crops=0, model="resnet18",
                   batch_size=64, num_epochs=15.0),
}


def _set_model(config, name, **vit_kwargs):
    """ViT options (stochastic depth, depth) and DINO's initial weights for ViTs; a ResNet gets
    the CIFAR stem on small images instead."""
    if name.startswith("vit"):
        presets.set_model(config, name, init_scheme="dino", **vit_kwargs)
    else:
        presets.set_model(config, name, cifar_stem=config.aug.view1.size <= 64)


def get_config(arg=None):
    from ssl_jax.config import parse_arg

    arg = parse_arg(arg, data="digits", model="", local_crops=-1, runlocal=False)
    config = presets.base_config("dino", arg.data)
    data = DATA[arg.data]
    num_local = data["local_crops"] if arg.local_crops < 0 else arg.local_crops
    global_scale = (0.4, 1.0) if num_local else (0.14, 1.0)
    global_size, local_size = data["global_size"], data["local_size"]
    config.aug = presets.dino_multicrop(global_size, global_scale, local_size, (0.05, 0.4),
                                        num_local)
    # The paper's ImageNet recipe (ViT-S/16 of its code): head 2048-2048-256 to K=65536
    # prototypes, student temperature 0.1, teacher 0.04 -> 0.07 over 30 epochs, centre momentum
    # 0.9, teacher momentum 0.996 -> 1 (cosine).
    config.dino = dict(
        out_dim=65536, hidden_dim=2048, bottleneck_dim=256, head_layers=3, head_bn=False,
        norm_last_layer=True, student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs=30.0, center_momentum=0.9, momentum_teacher=0.996)
    config.batch_size = data["batch_size"]
    config.num_epochs = data["num_epochs"]
    config.optim.update(
        name="adamw", base_lr=0.0005, lr_scaling="linear", warmup_epochs=10.0, b1=0.9, b2=0.999,
        weight_decay=0.04, weight_decay_end=0.4, grad_clip_norm=3.0,
        grad_clip_kind="per_parameter", freeze=(("head/last_layer", 1.0),))

    model = arg.model or data["model"]
    if arg.data == "imagenet2012" and model.startswith("vit"):
        # The README's full ViT-S/16 command (main_dino.py's defaults otherwise): --epochs 300
        # --teacher_temp 0.07 --warmup_teacher_temp_epochs 30 --norm_last_layer false, 16 GPUs
        # x 64 = batch 1024, 8 local crops.
        _set_model(config, model, drop_path_rate=0.1)
        config.dino.norm_last_layer = False
        config.optim.end_lr_factor = 1e-6 / (0.0005 * config.batch_size / 256)
    elif arg.data == "imagenet2012":
        # The README's ResNet-50 command: 8 GPUs x 64 = batch 512, 100 epochs, SGD LR 0.03
        # (x B/256), weight decay 1e-4 throughout, crops 0.14-1 and 0.05-0.14, teacher T 0.04.
        _set_model(config, model)
        config.batch_size, config.num_epochs = 512, 100.0
        for view in (config.aug.view1, config.aug.view2):
            view.crop_scale = (0.14, 1.0)
        config.aug.local.crop_scale = (0.05, 0.14)
        config.dino.update(warmup_teacher_temp=0.04, teacher_temp=0.04,
                           warmup_teacher_temp_epochs=0.0)
        config.optim.update(name="sgd", base_lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4,
                            momentum=0.9, end_lr_factor=1e-6 / (0.03 * 512 / 256))
    elif arg.data == "cifar10":  # CPU-sized depth, as MAE's CIFAR-10 preset (model=vit_ti4: 12)
        vit_kw = {} if arg.model else {"depth": 6}
        _set_model(config, model, drop_path_rate=0.1, **vit_kw)
        config.dino.update(out_dim=4096, hidden_dim=1024)
        config.data.num_workers = 2
    else:  # digits
        if model.startswith("vit"):
            _set_model(config, model, drop_path_rate=0.1, depth=4)
        else:
            presets.set_model(config, model, cifar_stem=True, width_multiplier=0.25)
        presets.dino_digits_views(config.aug)
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

r"""SimCLR (Chen et al. 2020) with a SimCLR-v2 projection head.

    python -m ssl_jax.train --config configs/simclr.py:data=digits --workdir /tmp/simclr
    python -m ssl_jax.train --config configs/simclr.py:data=cifar10 --workdir /tmp/simclr_c10 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10
    python -m ssl_jax.train --config configs/simclr.py:data=imagenet2012,model=resnet50 ...

Presets (``arg``): ``data=digits|cifar10|imagenet2012``, ``model=resnet18|resnet50|vit_ti4|...``
(default per dataset), ``runlocal`` (a smoke test of a few steps).

Recipes (the details and why: docs/recipes.md, "SimCLR"):
- data=imagenet2012: the paper's ResNet-50 recipe (batch 4096, LARS, 100 epochs).
- data=cifar10: the official CIFAR-10 command (batch 512, LR 1.0 x B/256, wd 1e-4, 1000 epochs,
  T=0.5, no blur, jitter 0.5): ResNet-18 with the CIFAR stem.
- data=digits: the built-in offline digits: a narrow ResNet-18, 40 epochs in ~3.5 min on 2 CPUs.
"""

from ssl_jax import presets
from ssl_jax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, data="digits", model="", runlocal=False)
    config = presets.base_config("simclr", arg.data)
    # The paper's ImageNet recipe: NT-Xent at temperature 0.1, SimCLR v2's 3-layer projection
    # head 2048-2048-128 with BatchNorm.
    config.simclr = dict(temperature=0.1, proj_hidden_dim=2048, proj_out_dim=128, proj_layers=3,
                         proj_bn=True)

    if arg.data == "imagenet2012":
        presets.set_model(config, arg.model or "resnet50")
        config.batch_size = 4096
        config.num_epochs = 100.0
        # The tf2 README's ImageNet command: --learning_rate=0.075 --learning_rate_scaling=sqrt
        # --weight_decay=1e-4 (0.075 x sqrt(4096) = 4.8, as 0.3 x 4096/256).
        config.optim.update(base_lr=0.075, lr_scaling="sqrt", weight_decay=1e-4,
                            warmup_epochs=10.0)
        config.simclr.update(temperature=0.1, proj_hidden_dim=2048, proj_out_dim=128)
    elif arg.data == "cifar10":
        presets.set_model(config, arg.model or "resnet18", cifar_stem=True, width_multiplier=1.0)
        config.batch_size = 512
        config.num_epochs = 1000.0
        config.checkpoint.every_steps = 1000
        # The official tf2 README's CIFAR-10 command: --learning_rate=1.0 --weight_decay=1e-4
        # with its default linear scaling: a peak LR of 1.0 x 512/256 = 2.0.
        config.optim.update(base_lr=1.0, weight_decay=1e-4, warmup_epochs=10.0)
        config.simclr.update(temperature=0.5, proj_hidden_dim=512, proj_out_dim=128)
        for view in (config.aug.view1, config.aug.view2):
            view.update(color_jitter=0.5, blur_p=0.0)
        config.data.num_workers = 2
    else:  # digits
        presets.set_model(config, arg.model or "resnet18", cifar_stem=True, width_multiplier=0.25)
        config.batch_size = 256
        config.num_epochs = 40.0
        config.log_every = 10
        config.checkpoint.every_steps = 100
        config.optim.update(base_lr=1.0, weight_decay=1e-6, warmup_epochs=10.0)
        config.simclr.update(temperature=0.2, proj_hidden_dim=256, proj_out_dim=64)
        for view in (config.aug.view1, config.aug.view2):
            view.update(crop_scale=(0.2, 1.0), color_jitter=0.5, blur_p=0.0)

    if arg.runlocal:
        presets.shrink_for_runlocal(config)
        config.simclr.update(proj_hidden_dim=64, proj_out_dim=32)
    config.lock()
    return config

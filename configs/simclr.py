r"""SimCLR (Chen et al. 2020) with a SimCLR-v2 projection head.

    python -m ssl_jax.train --config configs/simclr.py:data=digits --workdir /tmp/simclr
    python -m ssl_jax.train --config configs/simclr.py:data=cifar10 --workdir /tmp/simclr_c10 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10
    python -m ssl_jax.train --config configs/simclr.py:data=imagenet2012,model=resnet50 ...

Presets (``arg``): ``data=digits|cifar10|imagenet2012``, ``model=resnet18|resnet50|vit_ti4|...``
(default per dataset), ``runlocal`` (a smoke test of a few steps).

Recipes:
- imagenet2012: the paper's: ResNet-50, global batch 4096, LARS with LR 0.3 x B/256, weight
  decay 1e-6, 10 warm-up epochs then cosine, temperature 0.1, 100 epochs (the paper runs
  100-1000), colour-jitter strength 1.0, blur p=0.5, projection 2048-2048-128 with BN (v2).
- cifar10: the paper's CIFAR-10 settings (appendix B.9): ResNet-18 with the CIFAR stem, no blur,
  colour-jitter strength 0.5, temperature 0.5, LARS with LR 0.5 x B/256 (1.0 at B=512),
  weight decay 1e-6, batch 512; 200 epochs by default (the paper trains up to 1000).
- digits: the built-in offline data (8x8 digits upscaled to 16 px): a narrow CIFAR-style
  ResNet-18 (width 0.25), crops of scale 0.2-1 (tiny images lose their digit below that),
  strength 0.5, no blur, temperature 0.2, LARS with LR 1.0, batch 256, 40 epochs (200 steps,
  about 3.5 minutes on 2 CPU cores).
"""

from ssl_jax import presets
from ssl_jax.config import parse_arg
from ssl_jax.methods.simclr import simclr_config


def get_config(arg=None):
    arg = parse_arg(arg, data="digits", model="", runlocal=False)
    config = presets.base_config("simclr", arg.data)
    config.simclr = simclr_config()

    if arg.data == "imagenet2012":
        presets.set_model(config, arg.model or "resnet50")
        config.batch_size = 4096
        config.num_epochs = 100.0
        config.optim.update(base_lr=0.3, weight_decay=1e-6, warmup_epochs=10.0)
        config.simclr.update(temperature=0.1, proj_hidden_dim=2048, proj_out_dim=128)
    elif arg.data == "cifar10":
        presets.set_model(config, arg.model or "resnet18", cifar_stem=True, width_multiplier=1.0)
        config.batch_size = 512
        config.num_epochs = 200.0
        config.checkpoint.every_steps = 1000
        config.optim.update(base_lr=0.5, weight_decay=1e-6, warmup_epochs=10.0)
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

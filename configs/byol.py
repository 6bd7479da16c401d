r"""BYOL (Grill et al. 2020): an online network predicts a momentum target's projection.

    python -m ssl_jax.train --config configs/byol.py:data=digits --workdir /tmp/byol
    python -m ssl_jax.train --config configs/byol.py:data=cifar10 --workdir /tmp/byol_c10 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10
    python -m ssl_jax.train --config configs/byol.py:data=imagenet2012 ...

Presets (``arg``): ``data=digits|cifar10|imagenet2012``, ``model=resnet50|resnet18|vit_...``
(default per dataset), ``runlocal`` (a smoke test of a few steps).

Recipes (the details and why: docs/recipes.md, "BYOL and MoCo"):
- data=imagenet2012: the paper's: ResNet-50, batch 4096, 300 epochs, 10 warm-up, LARS LR 0.2 x
  B/256, weight decay 1.5e-6, tau 0.996 -> 1, asymmetric blur/solarize, MLPs 4096-256.
- data=cifar10: lightly's public CIFAR-10 benchmark (docs/.../cifar10_benchmark.py, BYOLModel):
  CIFAR-stem ResNet-18, batch 512, 200 epochs, SGD LR 0.06 x B/128, wd 5e-4 (both rescaled for
  BYOL's loss, 4x lightly's), MLPs 1024-256.
- data=digits: the built-in offline digits: a narrow ResNet-18, SimCLR's digits views (no blur,
  no solarize), 40 epochs, LARS LR 1.0 x B/256, tau 0.99 -> 1.
"""

from ssl_jax import presets
from ssl_jax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, data="digits", model="", runlocal=False)
    config = presets.base_config("byol", arg.data)
    size = config.aug.view1.size
    # BYOL's views (Table 6 of the paper): colour jitter 0.4/0.4/0.2/0.1 with p=0.8, grayscale
    # p=0.2, blur p=1.0 (view 1) / 0.1 (view 2) with SimCLR's 10%-of-side kernel, solarize p=0.2
    # on view 2 only.
    config.aug = dict(
        view1=presets.dino_view(size=size, crop_scale=(0.08, 1.0), blur_p=1.0,
                                blur_kernel="simclr"),
        view2=presets.dino_view(size=size, crop_scale=(0.08, 1.0), blur_p=0.1, solarize_p=0.2,
                                blur_kernel="simclr"))
    # The paper's ImageNet recipe: projector and predictor 4096-256, tau 0.996 -> 1 (cosine);
    # the online encoder is the one evaluated.
    config.byol = dict(proj_hidden_dim=4096, proj_out_dim=256, pred_hidden_dim=4096,
                       momentum=0.996, momentum_cosine=True, eval_encoder="online")
    # LARS, LR 0.2 x B/256, weight decay 1.5e-6, biases and BN excluded (optim.decay_mask).
    config.optim.update(name="lars", base_lr=0.2, lr_scaling="linear", weight_decay=1.5e-6,
                        warmup_epochs=10.0)

    if arg.data == "imagenet2012":
        presets.set_model(config, arg.model or "resnet50")
        config.batch_size = 4096
        config.num_epochs = 300.0
    elif arg.data == "cifar10":
        # lightly's CIFAR-10 benchmark (BYOLModel, batch 512, 200 epochs): SGD with momentum
        # 0.9, LR 6e-2 x B/128 (= 0.12 x B/256), weight decay 5e-4, cosine without warm-up,
        # projector 512-1024-256, predictor 256-1024-256, momentum 0.99, SimCLR-style views.
        # Its loss, 0.5 (-cos12 - cos21), is a quarter of BYOL's (2 - 2 cos12) + (2 - 2 cos21):
        # LR / 4 and weight decay x 4 make the same SGD updates as lightly's run.
        presets.set_encoder(config, arg.model or "resnet18", resnet=dict(cifar_stem=True))
        config.batch_size = 512
        config.num_epochs = 200.0
        config.checkpoint.every_steps = 1000
        config.optim.update(name="sgd", base_lr=0.12 / 4, weight_decay=5e-4 * 4, momentum=0.9,
                            warmup_epochs=0.0)
        config.byol.update(proj_hidden_dim=1024, pred_hidden_dim=1024, momentum=0.99,
                           momentum_cosine=False)
        config.aug = dict(view1=presets.lightly_cifar10_view(),
                          view2=presets.lightly_cifar10_view())
        config.data.num_workers = 2
    else:  # digits: SimCLR's digits backbone and views (crops 0.2-1, strength 0.5, no blur)
        presets.set_encoder(config, arg.model or "resnet18",
                            resnet=dict(cifar_stem=True, width_multiplier=0.25))
        config.batch_size = 256
        config.num_epochs = 40.0
        config.log_every = 10
        config.checkpoint.every_steps = 100
        config.optim.update(base_lr=1.0, weight_decay=1e-6, warmup_epochs=10.0)
        config.byol.update(proj_hidden_dim=512, proj_out_dim=128, pred_hidden_dim=512,
                           momentum=0.99)
        config.aug = dict(view1=presets.view_config(size=16, crop_scale=(0.2, 1.0),
                                                    color_jitter=0.5, blur_p=0.0),
                          view2=presets.view_config(size=16, crop_scale=(0.2, 1.0),
                                                    color_jitter=0.5, blur_p=0.0))

    if arg.runlocal:
        presets.shrink_for_runlocal(config)
        config.byol.update(proj_hidden_dim=64, proj_out_dim=32, pred_hidden_dim=64)
    config.lock()
    return config

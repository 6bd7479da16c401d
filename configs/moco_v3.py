r"""MoCo v3 (Chen, Xie, He 2021): query encoder + predictor against a momentum encoder, the
negatives from the global batch; for ViTs the patch projection frozen at its random init.

    python -m ssl_jax.train --config configs/moco_v3.py:data=digits --workdir /tmp/moco_v3
    python -m ssl_jax.train --config configs/moco_v3.py:data=cifar10 --workdir /tmp/moco_v3_c10 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10
    python -m ssl_jax.train --config configs/moco_v3.py:data=imagenet2012 ...   # ViT-S/16
    python -m ssl_jax.train --config configs/moco_v3.py:data=imagenet2012,model=resnet50 ...

Presets (``arg``): ``data=digits|cifar10|imagenet2012``, ``model=vit_s16|resnet50|vit_ti4|...``
(default per dataset), ``runlocal`` (a smoke test of a few steps).

Recipes (the details and why: docs/recipes.md, "BYOL and MoCo"):
- data=imagenet2012: the README's ViT-Small command (batch 1024, AdamW LR 1.5e-4 x B/256, wd 0.1,
  300 epochs, 40 warm-up, --stop-grad-conv1 --moco-m-cos --moco-t=.2); model=resnet50: its
  ResNet-50 300-epoch command (batch 4096, LARS LR 0.3 x B/256, wd 1e-6, T 1.0, crops 0.2-1).
- data=cifar10: solo-learn's public CIFAR-10 recipe (scripts/pretrain/cifar/mocov3.yaml): ResNet-18,
  batch 256, LARS LR 0.3, wd 1e-6, T 0.2, MLPs 4096-256, m 0.99 -> 1, 1000 epochs.
- data=digits: the built-in offline digits: a narrow ResNet-18, 40 epochs, LARS.
"""

from ssl_jax import presets
from ssl_jax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, data="digits", model="", runlocal=False)
    config = presets.base_config("moco_v3", arg.data)
    size = config.aug.view1.size
    # MoCo v3's views (BYOL's, with PIL's blur): jitter 0.4/0.4/0.2/0.1 p=0.8, grayscale p=0.2,
    # blur p=1.0 / 0.1, solarize p=0 / 0.2, crops 0.08-1 (--crop-min).
    config.aug = dict(
        view1=presets.dino_view(size=size, crop_scale=(0.08, 1.0), blur_p=1.0),
        view2=presets.dino_view(size=size, crop_scale=(0.08, 1.0), blur_p=0.1, solarize_p=0.2))
    # The paper's ViT recipe: projector 3 layers 4096-256, predictor 2 layers 4096-256 (BN after
    # the last layer of both), T 0.2, m 0.99 -> 1 (cosine), the patch projection frozen; the
    # query encoder is the one evaluated.
    config.moco_v3 = dict(temperature=0.2, proj_hidden_dim=4096, proj_out_dim=256, proj_layers=3,
                          pred_hidden_dim=4096, pred_last_bn=True, momentum=0.99,
                          momentum_cosine=True, freeze_patch_embed=True, eval_encoder="online")
    # AdamW (betas 0.9, 0.999), LR 1.5e-4 x B/256, weight decay 0.1, 40 warm-up epochs, cosine.
    config.optim.update(name="adamw", base_lr=1.5e-4, lr_scaling="linear", weight_decay=0.1,
                        warmup_epochs=40.0, b1=0.9, b2=0.999)

    model = arg.model or {"imagenet2012": "vit_s16"}.get(arg.data, "resnet18")
    if arg.data == "imagenet2012":
        config.batch_size = 1024
        config.num_epochs = 300.0
        # MoCo v3's ViT has a fixed 2-D sin-cos position embedding; its ResNets start with the
        # last BN of every block at 0 (zero_init_residual).
        presets.set_encoder(config, model, resnet=dict(zero_init_residual=True),
                            vit=dict(pos_embed="sincos"))
        if not model.startswith("vit"):  # the README's ResNet-50 300-epoch command
            _resnet_recipe(config)
            config.batch_size = 4096
            config.optim.update(name="lars", base_lr=0.3, weight_decay=1e-6, warmup_epochs=10.0)
            config.moco_v3.temperature = 1.0
            for view in (config.aug.view1, config.aug.view2):
                view.crop_scale = (0.2, 1.0)
    elif arg.data == "cifar10":
        # solo-learn's mocov3.yaml (asymmetric views without blur, LARS batch 256 LR 0.3,
        # wd 1e-6, 1000 epochs; solo-learn's LARS eta 0.02 with LR clipping is not optax's).
        _resnet_recipe(config)
        presets.set_encoder(config, model, resnet=dict(cifar_stem=True))
        config.batch_size = 256
        config.num_epochs = 1000.0
        config.checkpoint.every_steps = 1000
        config.optim.update(name="lars", base_lr=0.3, weight_decay=1e-6, warmup_epochs=10.0)
        for view in (config.aug.view1, config.aug.view2):
            view.blur_p = 0.0
        config.data.num_workers = 2
    else:  # digits: SimCLR's digits backbone and views, LARS
        _resnet_recipe(config)
        presets.set_encoder(config, model, resnet=dict(cifar_stem=True, width_multiplier=0.25))
        config.batch_size = 256
        config.num_epochs = 40.0
        config.log_every = 10
        config.checkpoint.every_steps = 100
        config.optim.update(name="lars", base_lr=1.0, weight_decay=1e-6, warmup_epochs=10.0)
        config.moco_v3.update(proj_hidden_dim=512, proj_out_dim=128, pred_hidden_dim=512)
        digits_view = dict(size=16, crop_scale=(0.2, 1.0), color_jitter=0.5, blur_p=0.0)
        config.aug = dict(view1=presets.view_config(**digits_view),
                          view2=presets.view_config(**digits_view))
    if model.startswith("vit") and arg.data != "imagenet2012":  # the ViT heads and trick
        presets.set_model(config, model, pos_embed="sincos")
        config.moco_v3.update(proj_layers=3, pred_last_bn=True, freeze_patch_embed=True)

    if arg.runlocal:
        presets.shrink_for_runlocal(config)
        config.moco_v3.update(proj_hidden_dim=64, proj_out_dim=32, pred_hidden_dim=64)
        config.moco_v3.freeze_patch_embed = config.model.name.startswith("vit")
    config.lock()
    return config


def _resnet_recipe(config):
    """The official ResNet heads: a 2-layer projector, no BN after the predictor's last layer,
    no patch projection to freeze."""
    config.moco_v3.update(proj_layers=2, pred_last_bn=False, freeze_patch_embed=False)

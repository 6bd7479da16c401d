r"""Rotation prediction, RotNet (Gidaris et al. 2018): which of 0/90/180/270 degrees an image
was turned by.

    python -m ssl_jax.train --config configs/rotation.py:data=digits --workdir /tmp/rotation
    python -m ssl_jax.evaluate --workdir /tmp/rotation
    python -m ssl_jax.train --config configs/rotation.py:data=cifar10 --workdir /tmp/rot_c10 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10

Presets (``arg``): ``data=digits|cifar10|imagenet2012``, ``model=resnet50|resnet18|vit_...``
(default per dataset), ``runlocal`` (a smoke test of a few steps).

Recipes (the official code's configs, github.com/gidariss/FeatureLearningRotNet, config/*.py):
- data=imagenet2012 (ImageNet_RotNet_AlexNet.py): batch 192 images (x 4 rotations), SGD momentum
  0.9, LR 0.01, weight decay 5e-4, 50 epochs, a random resized crop and flip. Not as the paper:
  ResNet-50 with a linear rotation head on its pooled features (Kolesnikov et al. 2019's
  setting; ssl_jax has no AlexNet), a cosine LR in place of the step schedule (/10 at epochs 15,
  30, 45), no Nesterov momentum (ssl_jax.optim's SGD).
- data=cifar10 (CIFAR10_RotNet_NIN4blocks.py): batch 128, SGD momentum 0.9, LR 0.1, weight
  decay 5e-4, 200 epochs; a CIFAR-stem ResNet-18 in place of the 4-block NIN, the cosine LR in
  place of its steps (/5 at 60, 120, 160), crops of 0.6-1 and flips in place of its 4-px-padded
  crops and flips.
- data=digits: the CIFAR-10 recipe on the built-in 16-px digits with SimCLR's digits backbone
  (ResNet-18, CIFAR stem, width 0.25); crops of 0.6-1, no flip (a mirrored digit is another
  shape), 30 epochs (a few minutes on 2 CPU cores).
"""

from ssl_jax import presets
from ssl_jax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, data="digits", model="", runlocal=False)
    config = presets.base_config("rotation", arg.data)
    size = config.aug.view1.size
    # RotNet's views: a crop and a flip, no colour augmentation (the angle is the only label).
    view = presets.view_config(size=size, crop_scale=(0.08, 1.0), flip=True, color_jitter=0.0,
                               color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    config.aug = dict(view1=view, view2=view)  # view2 is unused; kept for the shared keys
    # All four rotations of every image; a linear head on the encoder's pooled features.
    config.rotation = dict(num_rotations=4, head_hidden_dim=0, head_layers=1)
    config.optim.update(name="sgd", base_lr=0.01, lr_scaling="none", momentum=0.9,
                        weight_decay=5e-4, warmup_epochs=0.0)

    if arg.data == "imagenet2012":
        presets.set_model(config, arg.model or "resnet50")
        config.batch_size = 192
        config.num_epochs = 50.0
    elif arg.data == "cifar10":
        presets.set_encoder(config, arg.model or "resnet18", resnet=dict(cifar_stem=True))
        config.batch_size = 128
        config.num_epochs = 200.0
        config.optim.base_lr = 0.1
        config.aug.view1.crop_scale = (0.6, 1.0)
        config.data.num_workers = 2
    else:  # digits
        presets.set_encoder(config, arg.model or "resnet18",
                            resnet=dict(cifar_stem=True, width_multiplier=0.25))
        config.batch_size = 128
        config.num_epochs = 30.0
        config.optim.base_lr = 0.1
        config.aug.view1.update(crop_scale=(0.6, 1.0), flip=False)
        config.log_every = 10
        config.checkpoint.every_steps = 100

    if arg.runlocal:
        presets.shrink_for_runlocal(config)
    config.lock()
    return config

r"""Relative patch position, context prediction (Doersch et al. 2015): where a patch lies
relative to the centre patch of a 3x3 grid.

    python -m ssl_jax.train --config configs/context.py:data=digits --workdir /tmp/context
    python -m ssl_jax.evaluate --workdir /tmp/context
    python -m ssl_jax.train --config configs/context.py:data=cifar10 --workdir /tmp/context_c10 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10

Presets (``arg``): ``data=digits|cifar10|imagenet2012``, ``model=resnet50|resnet18|vit_...``
(default per dataset), ``colour=drop|project|none`` (the chromatic-aberration remedy; default
per dataset), ``runlocal`` (a smoke test of a few steps).

``aug.view1`` draws the crop that holds the grid (resized to ``context.crop_size``); its
``size`` is the evaluation's input (the whole image) and a ViT's position grid, resampled for
the patches.

Recipes:
- data=imagenet2012, the paper's geometry and the released code's (github.com/cdoersch/
  deepcontext, train.py): 96-px patches, a 48-px gap, +-7 px of jitter, colour dropping, each
  patch standardised; images of 150K-450K pixels there, here 400 px on the shorter side (213K
  pixels at 4:3) with a square crop of 0.5-1 of the image's area resized to the grid's 398 px (a
  random rescale like the paper's); a 3-layer head 4096-4096-8 on the two concatenated feature
  vectors (fc7, fc8, fc9); batch 256 pairs (the code: up to 512 patches a batch). Not as the
  paper: ResNet-50 for its AlexNet; SGD without momentum at a constant LR 0.007, no weight decay
  (the released solver: fixed LR 1e-5 on a loss summed over about 700 pairs, no momentum, no
  weight decay); 30 epochs (the paper trained for about four weeks; its iteration count is not
  used here).
- data=cifar10: the geometry scaled to 32-px images: 8-px patches, a 4-px gap, +-1 px, crop 34;
  colour dropping; a CIFAR-stem ResNet-18, head 1024-1024-8; batch 128, SGD momentum 0.9, LR 0.1,
  weight decay 5e-4 (RotNet's CIFAR-10 recipe), 200 epochs.
- data=digits: 16-px digits cropped (0.6-1) and resized to 24 px: 6-px patches, a 2-px gap, +-1
  px; no colour remedy (the digits are grey); SimCLR's digits backbone (ResNet-18, CIFAR stem,
  width 0.25), head 256-256-8; batch 128, SGD LR 0.1, 30 epochs.
"""

from ssl_jax import presets
from ssl_jax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, data="digits", model="", colour="", runlocal=False)
    config = presets.base_config("context", arg.data)
    size = config.aug.view1.size
    view = presets.view_config(size=size, crop_scale=(0.5, 1.0), crop_ratio=(1.0, 1.0),
                               flip=True, color_jitter=0.0, color_jitter_p=0.0, grayscale_p=0.0,
                               blur_p=0.0)
    config.aug = dict(view1=view, view2=view)  # view2 is unused; kept for the shared keys
    # The paper's grid: 96-px patches, 48 px apart, jittered by up to 7 px; colour dropping.
    config.context = dict(crop_size=398, patch_size=96, gap=48, jitter=7, colour="drop",
                          head_hidden_dim=4096, head_layers=3)
    config.optim.update(name="sgd", base_lr=0.007, lr_scaling="none", momentum=0.0,
                        weight_decay=0.0, warmup_epochs=0.0, end_lr_factor=1.0)

    if arg.data == "imagenet2012":
        presets.set_model(config, arg.model or "resnet50")
        config.data.image_size = 400
        config.batch_size = 256
        config.num_epochs = 30.0
    else:  # the CIFAR-10 and digits recipes: RotNet's CIFAR-10 optimizer
        config.optim.update(base_lr=0.1, momentum=0.9, weight_decay=5e-4, end_lr_factor=0.0)
        config.batch_size = 128
        if arg.data == "cifar10":
            presets.set_encoder(config, arg.model or "resnet18", resnet=dict(cifar_stem=True))
            config.num_epochs = 200.0
            config.context.update(crop_size=34, patch_size=8, gap=4, jitter=1,
                                  head_hidden_dim=1024)
            config.data.num_workers = 2
        else:  # digits
            presets.set_encoder(config, arg.model or "resnet18",
                                resnet=dict(cifar_stem=True, width_multiplier=0.25))
            config.num_epochs = 30.0
            config.aug.view1.update(crop_scale=(0.6, 1.0), flip=False)
            config.context.update(crop_size=24, patch_size=6, gap=2, jitter=1, colour="none",
                                  head_hidden_dim=256)
            config.log_every = 10
            config.checkpoint.every_steps = 100
    if arg.colour:
        config.context.colour = arg.colour

    if arg.runlocal:
        presets.shrink_for_runlocal(config)
        config.context.update(crop_size=18, patch_size=4, gap=2, jitter=1, head_hidden_dim=32)
    config.lock()
    return config

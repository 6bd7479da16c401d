r"""Colorization (Zhang, Isola, Efros 2016): predict the ab channels of a Lab image from its L.

    python -m ssl_jax.train --config configs/colorization.py:data=cifar10 --workdir /tmp/col \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10
    python -m ssl_jax.evaluate --workdir /tmp/col   # linear + kNN on the L input; the picture
    python -m ssl_jax.train --config configs/colorization.py:data=imagenet2012 ...

Presets (``arg``): ``data=cifar10|imagenet2012|digits`` (default cifar10), ``model=resnet50|
resnet18|vit_...`` (default per dataset), ``loss=classification|regression`` (default the
paper's classification), ``runlocal`` (a smoke test of a few steps).

Recipes:
- data=imagenet2012: the paper's (Sec. 3 and its train prototxt): 176-px random crops of the
  256-px image with flips, output at 1/4 of the input's side, 313-way (here the 261 bins that
  8-bit sRGB reaches) soft-encoded targets (5 neighbours, sigma 5), rebalancing lambda 0.5 with
  a prior smoothed by sigma 5, annealed-mean T 0.38, Adam (beta2 0.99) LR 3e-5, weight decay
  1e-3, batch 40, 450k iterations (14 epochs). The paper's network is a VGG-style stack; here
  the project's ResNet-50 (its last stage's map feeds a 256-wide upsampling head, the width of
  the paper's conv8); the paper's step LR drops (x1/3 at 200k, 375k) become a cosine decay;
  Adam's weight decay is AdamW's (decoupled).
- data=cifar10: the same loss and bins on 32-px images: a CIFAR-stem ResNet-18 (the project's
  CIFAR backbone), output at 1/2 of the side (16x16; 1/4 would leave 8x8 ab for a 32-px image),
  a 128-wide head, crops 0.5-1 (the paper's crop keeps ~47% of the area: 176^2 / 256^2), batch
  256, AdamW LR 1e-3 x B/256 with 5 warm-up epochs (the paper's 3e-5 at batch 40 trains a
  VGG from scratch for 450k steps; a CPU budget needs a larger rate), 100 epochs.
- data=digits: the built-in digits are greyscale (one channel): there is no colour to predict,
  so training refuses this preset (naming ``data.name``); it exists so that every config has
  the three presets and a single-channel source fails with that message, not a silent zero
  loss. Its values (16 px, narrow ResNet-18, stride 2) are SimCLR's digits ones.
"""

from ssl_jax import presets
from ssl_jax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, data="cifar10", model="", loss="classification", runlocal=False)
    config = presets.base_config("colorization", arg.data)
    # The paper's loss: 10-unit ab cells, soft encoding over 5 neighbours with sigma 5,
    # rebalancing lambda 0.5 with a prior smoothed by sigma 5, annealed mean T=0.38, the output
    # at 1/4 of the input's side; conv8 of its network is 256 wide.
    config.colorization = dict(loss=arg.loss, ab_grid=10, sigma=5.0, num_neighbours=5,
                               rebalance_lambda=0.5, prior_sigma=5.0, prior_steps=0,
                               target_stride=4, head_dim=256, annealed_t=0.38)
    # Adam (beta1 0.9, beta2 0.99), LR 3e-5 at batch 40, weight decay 1e-3, no warm-up.
    config.optim.update(name="adamw", base_lr=3e-5, lr_scaling="none", b1=0.9, b2=0.99,
                        weight_decay=1e-3, warmup_epochs=0.0)
    # Views: a random crop and a flip; no colour jitter or grayscale (colour is the target).
    plain = dict(flip=True, color_jitter=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)

    if arg.data == "imagenet2012":
        presets.set_encoder(config, arg.model or "resnet50")
        config.batch_size = 40
        config.num_epochs = 450_000 * 40 / 1_281_167  # 450k iterations
        view = presets.view_config(size=176, crop_scale=(176**2 / 256**2,) * 2,
                                   crop_ratio=(1.0, 1.0), **plain)
        config.data.train_region = "square"  # a crop of the 256-px image, as the paper's
    elif arg.data == "cifar10":
        presets.set_encoder(config, arg.model or "resnet18", resnet=dict(cifar_stem=True))
        config.batch_size = 256
        config.num_epochs = 100.0
        config.colorization.update(target_stride=2, head_dim=128)
        config.optim.update(base_lr=1e-3, lr_scaling="linear", warmup_epochs=5.0)
        config.data.num_workers = 2
        view = presets.view_config(size=32, crop_scale=(0.5, 1.0), **plain)
    else:  # digits: refused by the method (greyscale); SimCLR's digits backbone and size
        presets.set_encoder(config, arg.model or "resnet18",
                            resnet=dict(cifar_stem=True, width_multiplier=0.25))
        config.batch_size = 256
        config.num_epochs = 40.0
        config.colorization.update(target_stride=2, head_dim=64)
        config.optim.update(base_lr=1e-3, lr_scaling="linear", warmup_epochs=2.0)
        view = presets.view_config(size=16, crop_scale=(0.5, 1.0), **plain)
    config.aug = dict(view1=view, view2=view)  # view2 is unused; kept for the shared keys

    if arg.runlocal:
        presets.shrink_for_runlocal(config)
        config.colorization.update(target_stride=2, head_dim=16)
    config.lock()
    return config

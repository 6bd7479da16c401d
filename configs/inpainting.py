r"""Inpainting (Pathak et al. 2016, the context encoder): reconstruct a removed region (L2 only).

    python -m ssl_jax.train --config configs/inpainting.py:data=digits --workdir /tmp/inpaint
    python -m ssl_jax.evaluate --workdir /tmp/inpaint   # linear + kNN; masked | filled | original
    python -m ssl_jax.train --config configs/inpainting.py:data=cifar10 --workdir /tmp/inp_c10 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10
    python -m ssl_jax.train --config configs/inpainting.py:data=imagenet2012 ...

Presets (``arg``): ``data=digits|cifar10|imagenet2012``, ``model=resnet50|resnet18|vit_...``
(default per dataset), ``mask=center|blocks`` (default the central square), ``runlocal``.

Recipes:
- data=imagenet2012: the released code's (train.lua): images loaded at 350 px, random 128-px
  crops, the central 64-px square predicted of which the inner 56 px are removed (overlap 4 px,
  weighted 10x), Adam LR 2e-4 with beta1 0.5, batch 64, 25 epochs, L2 weight 1 (the adversarial
  term, weight 0.001 there, is left out). The paper's AlexNet becomes the project's ResNet-50;
  its channel-wise fully connected layer is kept; the up-convolutional decoder is a 256-wide
  upsampling one. Random blocks (``mask=blocks``): 4 squares of 32 px (a quarter of the side,
  "up to 1/4 of the image" in the paper).
- data=cifar10: the same proportions on 32 px (a 16-px predicted centre: 14 removed + a 1-px
  overlap, as 4 of 128), a CIFAR-stem ResNet-18 (the project's CIFAR backbone), batch 256,
  Adam LR 2e-4 x B/64 (the released LR scaled linearly from its batch of 64), beta1 0.5, 100
  epochs, a 128-wide decoder; blocks: 4 squares of 8 px.
- data=digits: 16 px (8-px predicted centre: 6 removed + 1-px overlap), SimCLR's digits
  backbone (a narrow CIFAR-stem ResNet-18), batch 256, the CIFAR LR rule, 40 epochs (SimCLR's
  digits length, about 4 minutes on 2 CPU cores), a 64-wide decoder; blocks: 3 of 4 px.
"""

from ssl_jax import presets
from ssl_jax.config import parse_arg

DATA = {  # hole_size: removed centre; overlap: its visible ring, weighted overlap_weight
    "imagenet2012": dict(model="resnet50", hole_size=56, overlap=4, num_blocks=4, block_size=32,
                         decoder_dim=256, batch_size=64, num_epochs=25.0),
    "cifar10": dict(model="resnet18", hole_size=14, overlap=1, num_blocks=4, block_size=8,
                    decoder_dim=128, batch_size=256, num_epochs=100.0),
    "digits": dict(model="resnet18", hole_size=6, overlap=1, num_blocks=3, block_size=4,
                   decoder_dim=64, batch_size=256, num_epochs=40.0),
}


def get_config(arg=None):
    arg = parse_arg(arg, data="digits", model="", mask="center", runlocal=False)
    config = presets.base_config("inpainting", arg.data)
    data = DATA[arg.data]
    config.inpainting = dict(mask_kind=arg.mask, hole_size=data["hole_size"],
                             overlap=data["overlap"], overlap_weight=10.0,
                             num_blocks=data["num_blocks"], block_size=data["block_size"],
                             decoder_dim=data["decoder_dim"], channel_fc=True)
    config.batch_size = data["batch_size"]
    config.num_epochs = data["num_epochs"]
    # Adam, beta1 0.5 (the DCGAN setting the released code keeps), no weight decay or warm-up;
    # base_lr is per 256 examples (the released 2e-4 at batch 64 is 8e-4 per 256).
    config.optim.update(name="adamw", base_lr=2e-4 * 256 / 64, lr_scaling="linear", b1=0.5,
                        b2=0.999, weight_decay=0.0, warmup_epochs=0.0)
    plain = dict(flip=True, color_jitter=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)

    if arg.data == "imagenet2012":
        presets.set_encoder(config, arg.model or data["model"])
        config.data.update(image_size=350, train_region="square")  # loadSize 350, crop 128
        view = presets.view_config(size=128, crop_scale=((128 / 350) ** 2,) * 2,
                                   crop_ratio=(1.0, 1.0), **plain)
    elif arg.data == "cifar10":
        presets.set_encoder(config, arg.model or data["model"], resnet=dict(cifar_stem=True))
        config.data.num_workers = 2
        view = presets.view_config(size=32, crop_scale=(0.5, 1.0), **plain)
    else:
        presets.set_encoder(config, arg.model or data["model"],
                            resnet=dict(cifar_stem=True, width_multiplier=0.25))
        config.log_every = 10
        config.checkpoint.every_steps = 100
        view = presets.view_config(size=16, crop_scale=(0.5, 1.0), **plain)
    config.aug = dict(view1=view, view2=view)  # view2 is unused; kept for the shared keys

    if arg.runlocal:
        presets.shrink_for_runlocal(config)
        config.inpainting.update(hole_size=6, overlap=1, num_blocks=2, block_size=4,
                                 decoder_dim=16)
    config.lock()
    return config

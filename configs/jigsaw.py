r"""Jigsaw puzzles (Noroozi & Favaro 2016): which of a fixed set of permutations shuffled the 3x3
tiles of a crop.

    python -m ssl_jax.train --config configs/jigsaw.py:data=digits --workdir /tmp/jigsaw
    python -m ssl_jax.evaluate --workdir /tmp/jigsaw
    python -m ssl_jax.train --config configs/jigsaw.py:data=cifar10 --workdir /tmp/jigsaw_c10 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10

Presets (``arg``): ``data=digits|cifar10|imagenet2012``, ``model=resnet50|resnet18|vit_...``
(default per dataset), ``runlocal`` (a smoke test of a few steps).

``aug.view1`` draws the puzzle's crop (resized to ``jigsaw.crop_size``); its ``size`` is the
evaluation's input (the whole image) and a ViT's position grid, resampled for the tiles.

Recipes:
- data=imagenet2012, the paper's (Sec. 3.3 and 4): images at 256 px, a 225-px crop (here a
  square of 0.58-0.77 of the image's area, the share a 225-px square has of a 256-px image,
  resized to 225), 64-px tiles in its 75-px cells, 1,000 permutations of maximal Hamming
  distance (Algorithm 1), tiles standardised each on its own, batch 256, SGD LR 0.01 (momentum
  0.9 and weight decay 5e-4: not stated in the paper, the usual AlexNet values), 350K iterations
  (70 epochs); grayscale images 30% of the time against chromatic aberration. Not as the paper:
  ResNet-50 for its AlexNet (Goyal et al. 2019's jigsaw baseline), a 2-layer head 4096-1000 on
  the 9 concatenated feature vectors (the paper: fc6 per tile, 1024, then fc7 4096, fc8), a
  cosine LR, no colour-channel jitter.
- data=cifar10: the paper's geometry scaled to 32-px images: a 30-px crop, 8-px tiles in 10-px
  cells (the paper's 64/75), 100 permutations (its Table 3 smaller set), a CIFAR-stem ResNet-18,
  a 2-layer head 1024; batch 128, SGD LR 0.1 (RotNet's CIFAR-10 recipe), 200 epochs.
- data=digits: 16-px digits cropped (0.6-1) and resized to 24 px, 6-px tiles in 8-px cells, 100
  permutations, SimCLR's digits backbone (ResNet-18, CIFAR stem, width 0.25), a 2-layer head 256;
  batch 128, SGD LR 0.1, 30 epochs (a few minutes on 2 CPU cores).
"""

from ssl_jax import presets
from ssl_jax.config import parse_arg

IMAGENET_CROP_AREA = ((225 / 256) ** 2 * 3 / 4, (225 / 256) ** 2)  # a 256x341 or 256x256 image


def get_config(arg=None):
    arg = parse_arg(arg, data="digits", model="", runlocal=False)
    config = presets.base_config("jigsaw", arg.data)
    size = config.aug.view1.size
    view = presets.view_config(size=size, crop_scale=tuple(round(a, 4) for a in
                                                           IMAGENET_CROP_AREA),
                               crop_ratio=(1.0, 1.0), flip=True, color_jitter=0.0,
                               color_jitter_p=0.0, grayscale_p=0.3, blur_p=0.0)
    config.aug = dict(view1=view, view2=view)  # view2 is unused; kept for the shared keys
    # The paper's puzzle: a 225-px crop, 64-px tiles, 1,000 permutations of maximal Hamming
    # distance (Algorithm 1; min_hamming=2 adds no constraint), fc7 4096 -> fc8.
    config.jigsaw = dict(crop_size=225, tile_size=64, num_permutations=1000, min_hamming=2,
                         permutation_seed=0, head_hidden_dim=4096, head_layers=2)
    config.optim.update(name="sgd", base_lr=0.01, lr_scaling="none", momentum=0.9,
                        weight_decay=5e-4, warmup_epochs=0.0)

    if arg.data == "imagenet2012":
        presets.set_model(config, arg.model or "resnet50")
        config.batch_size = 256
        config.num_epochs = 70.0
    elif arg.data == "cifar10":
        presets.set_encoder(config, arg.model or "resnet18", resnet=dict(cifar_stem=True))
        config.batch_size = 128
        config.num_epochs = 200.0
        config.optim.base_lr = 0.1
        config.aug.view1.update(crop_scale=(0.6, 1.0), grayscale_p=0.0)
        config.jigsaw.update(crop_size=30, tile_size=8, num_permutations=100,
                             head_hidden_dim=1024)
        config.data.num_workers = 2
    else:  # digits
        presets.set_encoder(config, arg.model or "resnet18",
                            resnet=dict(cifar_stem=True, width_multiplier=0.25))
        config.batch_size = 128
        config.num_epochs = 30.0
        config.optim.base_lr = 0.1
        config.aug.view1.update(crop_scale=(0.6, 1.0), flip=False, grayscale_p=0.0)
        config.jigsaw.update(crop_size=24, tile_size=6, num_permutations=100,
                             head_hidden_dim=256)
        config.log_every = 10
        config.checkpoint.every_steps = 100

    if arg.runlocal:
        presets.shrink_for_runlocal(config)
        config.jigsaw.update(crop_size=12, tile_size=4, num_permutations=10,
                             head_hidden_dim=32)
    config.lock()
    return config

r"""MoCo v2 (Chen et al. 2020): InfoNCE against a queue of keys from a momentum encoder.

    python -m ssl_jax.train --config configs/moco_v2.py:data=digits --workdir /tmp/moco_v2
    python -m ssl_jax.train --config configs/moco_v2.py:data=cifar10 --workdir /tmp/moco_v2_c10 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10
    python -m ssl_jax.train --config configs/moco_v2.py:data=imagenet2012 ...

Presets (``arg``): ``data=digits|cifar10|imagenet2012``, ``model=resnet50|resnet18|vit_...``
(default per dataset), ``runlocal`` (a smoke test of a few steps).

Recipes (the details and why: docs/recipes.md, "BYOL and MoCo"):
- data=imagenet2012: the paper's (the official ``--mlp --moco-t 0.2 --aug-plus --cos``): ResNet-50,
  batch 256, 200 epochs, SGD LR 0.03 x B/256 with a cosine, wd 1e-4, T 0.2, K 65536, m 0.999.
- data=cifar10: lightly's public CIFAR-10 benchmark (docs/.../cifar10_benchmark.py, MocoModel at
  batch 512): CIFAR-stem ResNet-18, 200 epochs, SGD LR 0.06 x B/128, wd 5e-4, T 0.1, K 8192,
  m 0.99, symmetric loss, 8 BatchNorm groups with shuffled keys.
- data=digits: the built-in offline digits: a narrow ResNet-18, 40 epochs, LARS, K 1024.
"""

from ssl_jax import presets
from ssl_jax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, data="digits", model="", runlocal=False)
    config = presets.base_config("moco_v2", arg.data)
    size = config.aug.view1.size
    # MoCo v2's "aug+" views (the same for query and key): crops 0.2-1, colour jitter
    # 0.4/0.4/0.4/0.1 with p=0.8, grayscale p=0.2, PIL's Gaussian blur (sigma 0.1-2) p=0.5, flip.
    view = dict(size=size, crop_scale=(0.2, 1.0), color_jitter=1.0, color_jitter_p=0.8,
                brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, grayscale_p=0.2,
                blur_p=0.5, blur_kernel="pil", flip=True)
    config.aug = dict(view1=presets.view_config(**view), view2=presets.view_config(**view))
    # The paper's ImageNet recipe: MLP head 2048-128, T 0.2, K 65536 keys, m 0.999; shuffling
    # BN over the official code's 8 GPUs (8 BatchNorm groups of the global batch, see
    # ssl_jax/methods/moco_v2.py); the query encoder is the one evaluated.
    config.moco_v2 = dict(temperature=0.2, proj_hidden_dim=2048, proj_out_dim=128,
                          queue_size=65536, momentum=0.999, momentum_cosine=False, bn_groups=8,
                          symmetric=False, eval_encoder="online")
    # SGD with momentum 0.9, LR 0.03 x B/256, weight decay 1e-4, cosine (--cos), no warm-up.
    config.optim.update(name="sgd", base_lr=0.03, lr_scaling="linear", weight_decay=1e-4,
                        momentum=0.9, warmup_epochs=0.0)

    if arg.data == "imagenet2012":
        presets.set_model(config, arg.model or "resnet50")
        config.batch_size = 256
        config.num_epochs = 200.0
    elif arg.data == "cifar10":
        # lightly's CIFAR-10 benchmark (MocoModel at batch 512): SGD LR 6e-2 x B/128
        # (= 0.12 x B/256), weight decay 5e-4, cosine without warm-up, head 512-512-128, T 0.1,
        # a memory bank of 8192 (their note (**) for batch 512), m 0.99, symmetric loss, split
        # BatchNorm in 8 groups with the keys' batch shuffled, SimCLR-style views; its
        # ResNetGenerator keeps torch's default initial weights (init_scheme='pytorch': +3.8
        # linear / +0.8 kNN over 'goyal' at 390 steps, docs/benchmarks/all_methods_cifar10.md).
        presets.set_encoder(config, arg.model or "resnet18",
                            resnet=dict(cifar_stem=True, init_scheme="pytorch"))
        config.batch_size = 512
        config.num_epochs = 200.0
        config.checkpoint.every_steps = 1000
        config.optim.update(base_lr=0.12, weight_decay=5e-4)
        config.moco_v2.update(temperature=0.1, proj_hidden_dim=512, queue_size=8192,
                              momentum=0.99, symmetric=True)
        config.aug = dict(view1=presets.lightly_cifar10_view(),
                          view2=presets.lightly_cifar10_view())
        config.data.num_workers = 2
    else:  # digits: SimCLR's digits backbone, views and LARS; K below the 1,437 train images
        presets.set_encoder(config, arg.model or "resnet18",
                            resnet=dict(cifar_stem=True, width_multiplier=0.25))
        config.batch_size = 256
        config.num_epochs = 40.0
        config.log_every = 10
        config.checkpoint.every_steps = 100
        config.optim.update(name="lars", base_lr=1.0, weight_decay=1e-6, warmup_epochs=10.0)
        config.moco_v2.update(proj_hidden_dim=256, proj_out_dim=64, queue_size=1024,
                              momentum=0.99, symmetric=True)
        digits_view = dict(size=16, crop_scale=(0.2, 1.0), color_jitter=0.5, blur_p=0.0)
        config.aug = dict(view1=presets.view_config(**digits_view),
                          view2=presets.view_config(**digits_view))

    if arg.runlocal:
        presets.shrink_for_runlocal(config)
        config.moco_v2.update(proj_hidden_dim=64, proj_out_dim=32, queue_size=64, bn_groups=2)
    config.lock()
    return config

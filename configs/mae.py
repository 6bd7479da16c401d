r"""MAE (He et al. 2022): masked autoencoder pre-training of a ViT.

    python -m ssl_jax.train --config configs/mae.py:data=digits --workdir /tmp/mae
    python -m ssl_jax.evaluate --workdir /tmp/mae      # linear (MAE's BN protocol) + kNN
    python -m ssl_jax.finetune --workdir /tmp/mae      # MAE's headline: end-to-end fine-tuning
    python -m ssl_jax.train --config configs/mae.py:data=cifar10 --workdir /tmp/mae_c10 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10
    python -m ssl_jax.train --config configs/mae.py:data=imagenet2012 ...

Presets (``arg``): ``data=digits|cifar10|imagenet2012``, ``model=vit_b16|vit_ti4|...`` (default
per dataset), ``mask=random|block|grid`` (the paper's ablation; default random), ``runlocal``.

Recipes (the details and why: docs/recipes.md, "MAE"):
- data=imagenet2012: the paper's ViT-B/16 recipe (75% masked, decoder 8x512, batch 4096, 800 ep).
- data=cifar10: a 6-block ViT-Ti/4 with a 2x128 decoder, 200 epochs, sized for a CPU hour's test.
- data=digits: a 4-block ViT-Ti/2 on the built-in 16-px digits, 150 epochs, LR 1.5e-3 x B/256.
"""

from ssl_jax import presets
from ssl_jax.config import parse_arg

DATA = {  # depth 0: the named ViT's own (ViT-B/16's 12 blocks)
    "imagenet2012": dict(model="vit_b16", depth=0, batch_size=4096, num_epochs=800.0,
                         warmup_epochs=40.0),
    "cifar10": dict(model="vit_ti4", depth=6, batch_size=256, num_epochs=200.0,
                    warmup_epochs=10.0),
    "digits": dict(model="vit_ti2", depth=4, batch_size=128, num_epochs=150.0,
                   warmup_epochs=10.0),
}


def get_config(arg=None):
    arg = parse_arg(arg, data="digits", model="", mask="random", runlocal=False)
    config = presets.base_config("mae", arg.data)
    data = DATA[arg.data]
    crop = config.aug.view1.size
    view = presets.view_config(size=crop, crop_scale=(0.2, 1.0), flip=True, color_jitter=0.0,
                               color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    config.aug = dict(view1=view, view2=view)  # view2 is unused; kept for the shared keys
    # The paper's ImageNet recipe (ViT-B/16): 75% of the patches masked at random, loss on
    # per-patch normalised pixels, decoder 8 blocks of width 512 with 16 heads.
    config.mae = dict(mask_ratio=0.75, mask_kind=arg.mask, block_min_patches=16,
                      norm_pix_loss=True, decoder_dim=512, decoder_depth=8, decoder_heads=16)
    config.batch_size = data["batch_size"]
    config.num_epochs = data["num_epochs"]
    config.optim.update(name="adamw", base_lr=1.5e-4, lr_scaling="linear",
                        warmup_epochs=data["warmup_epochs"], b1=0.9, b2=0.95, weight_decay=0.05,
                        grad_clip_norm=0.0)
    config.eval.probe_normalize = "batchnorm"  # MAE's BatchNorm1d(affine=False) protocol
    vit_kw = {"depth": data["depth"]} if data["depth"] and not arg.model else {}
    presets.set_model(config, arg.model or data["model"], pos_embed="sincos", **vit_kw)

    if arg.data != "imagenet2012":  # the CPU-sized decoder
        config.mae.update(decoder_dim=128, decoder_depth=2, decoder_heads=4)
    if arg.data == "cifar10":
        config.data.num_workers = 2
    elif arg.data == "digits":
        config.optim.base_lr = 1.5e-3
        config.log_every = 20
        config.checkpoint.every_steps = 500

    if arg.runlocal:
        presets.shrink_for_runlocal(config)
        config.mae.update(decoder_dim=32, decoder_depth=1, decoder_heads=2)
        config.model.pos_embed = "sincos"
    config.lock()
    return config

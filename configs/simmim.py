r"""SimMIM (Xie et al. 2022): masked image modelling by regressing raw pixels with a linear head.

    python -m ssl_jax.train --config configs/simmim.py:data=digits --workdir /tmp/simmim
    python -m ssl_jax.evaluate --workdir /tmp/simmim    # linear + kNN (mean of patch tokens)
    python -m ssl_jax.finetune --workdir /tmp/simmim    # SimMIM's headline: fine-tuning
    python -m ssl_jax.train --config configs/simmim.py:data=cifar10 --workdir /tmp/simmim_c10 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10
    python -m ssl_jax.train --config configs/simmim.py:data=imagenet2012 ...

Presets (``arg``): ``data=digits|cifar10|imagenet2012``, ``model=vit_b16|vit_ti4|...`` (default
per dataset), ``runlocal`` (a smoke test of a few steps).

Recipes (the details and why: docs/recipes.md, "SimMIM"):
- data=imagenet2012: the official ViT-B/16 800-epoch config (32-px mask patches, 60% masked,
  batch 2048, base LR 1e-4 x B/512, 10 warm-up epochs, layer scale 0.1, shared relative position
  bias, crops 0.67-1); warm-up + cosine where its config steps the LR down at epoch 700.
- data=cifar10: a 6-block ViT-Ti/4, 8-px mask patches (two model patches, as 32 over 16), the
  paper's AdamW rule 8e-4 x B/512 with warm-up + cosine, 100 epochs.
- data=digits: a 4-block ViT-Ti/2 on the built-in 16-px digits, 4-px mask patches, 100 epochs.
"""

from ssl_jax import presets
from ssl_jax.config import parse_arg

DATA = {  # depth 0: the named ViT's own (ViT-B/16's 12 blocks); base_lr is per 256 examples
    "imagenet2012": dict(model="vit_b16", depth=0, mask_patch_size=32, batch_size=2048,
                         num_epochs=800.0, warmup_epochs=10.0, base_lr=1e-4 * 256 / 512),
    "cifar10": dict(model="vit_ti4", depth=6, mask_patch_size=8, batch_size=256,
                    num_epochs=100.0, warmup_epochs=10.0, base_lr=8e-4 * 256 / 512),
    "digits": dict(model="vit_ti2", depth=4, mask_patch_size=4, batch_size=128,
                   num_epochs=100.0, warmup_epochs=10.0, base_lr=1.5e-3),
}
# SimMIM's ViT (BEiT's): no absolute position embedding, one relative position bias shared by
# the blocks, layer scale 0.1, stochastic depth 0.1, a mask token; mean pooling as its
# fine-tuning; BEiT's initial weights (trunc-normal 0.02 and fix_init_weight).
VIT_OPTIONS = dict(pos_embed="none", rel_pos_bias=True, use_mask_token=True, layer_scale_init=0.1,
                   drop_path_rate=0.1, pool_type="mean", init_scheme="beit")


def get_config(arg=None):
    arg = parse_arg(arg, data="digits", model="", runlocal=False)
    config = presets.base_config("simmim", arg.data)
    data = DATA[arg.data]
    crop = config.aug.view1.size
    # SimMIMTransform: RandomResizedCrop(scale 0.67-1, ratio 3/4-4/3), flip, nothing else.
    view = presets.view_config(size=crop, crop_scale=(0.67, 1.0), flip=True, color_jitter=0.0,
                               color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    config.aug = dict(view1=view, view2=view)  # view2 is unused; kept for the shared keys
    # The paper's masking: 32-px mask patches at 224 px, 60% of them masked at random.
    config.simmim = dict(mask_patch_size=data["mask_patch_size"], mask_ratio=0.6)
    config.batch_size = data["batch_size"]
    config.num_epochs = data["num_epochs"]
    # AdamW (0.9, 0.999), weight decay 0.05, gradient norm clipped at 5 (the code's CLIP_GRAD),
    # cosine to MIN_LR 5e-6 x B/512 (the code's default, a twentieth of the base LR of ViT-B).
    config.optim.update(name="adamw", base_lr=data["base_lr"], lr_scaling="linear",
                        warmup_epochs=data["warmup_epochs"], b1=0.9, b2=0.999, weight_decay=0.05,
                        grad_clip_norm=5.0, end_lr_factor=5e-6 / 1e-4)
    vit_kw = {"depth": data["depth"]} if data["depth"] and not arg.model else {}
    presets.set_model(config, arg.model or data["model"], **VIT_OPTIONS, **vit_kw)

    if arg.data == "cifar10":
        config.data.num_workers = 2
    elif arg.data == "digits":
        config.log_every = 20
        config.checkpoint.every_steps = 500

    if arg.runlocal:
        presets.shrink_for_runlocal(config)  # 16-px views; ViT-Ti/2 with 2 blocks: an 8x8 grid
        presets.set_model(config, "vit_ti2", depth=2, **VIT_OPTIONS)
        config.simmim.mask_patch_size = 4  # 4x4 mask patches, 10 of 16 masked
    config.lock()
    return config

r"""BEiT (Bao et al. 2022): masked image modelling of a frozen dVAE's visual tokens.

    python -m ssl_jax.train --config configs/dvae.py:data=digits --workdir /tmp/tok   # tokenizer
    python -m ssl_jax.train --config configs/beit.py:data=digits --workdir /tmp/beit \
        --config.beit.tokenizer_workdir=/tmp/tok
    python -m ssl_jax.evaluate --workdir /tmp/beit     # linear + kNN (mean of patch tokens)
    python -m ssl_jax.finetune --workdir /tmp/beit     # BEiT's headline: fine-tuning, decay 0.65

The tokenizer's workdir must stay in place: the BEiT run reads its config (grid, vocabulary)
whenever it is built, and its weights once when the run starts (they are then saved in every
BEiT checkpoint).

Presets (``arg``): ``data=digits|cifar10|imagenet2012``, ``model=vit_b16|vit_ti4|...`` (default per
dataset), ``runlocal`` (pairs with ``configs/dvae.py:data=digits,runlocal``). ``beit.vocab_size``
of each preset is that of the same preset of ``configs/dvae.py``, and the ViT's patch grid equals
that tokenizer's token grid.

Recipes (the details and why: docs/recipes.md, "BEiT"):
- data=imagenet2012: the paper's ViT-B/16 recipe (V=8192, 75 of 196 patches masked, 800 epochs).
- data=cifar10: a 6-block ViT-Ti/4, V=512, 25 of 64 patches masked, 100 epochs (CPU-sized).
- data=digits: a 4-block ViT-Ti/2 on the built-in 16-px digits, V=128, without colour jitter.
"""

from ssl_jax import presets
from ssl_jax.config import parse_arg

DATA = {  # depth 0: the named ViT's own; base_lr is per 256 examples (x B/256)
    "imagenet2012": dict(model="vit_b16", depth=0, vocab_size=8192, batch_size=2048,
                         num_epochs=800.0, warmup_epochs=10.0, base_lr=1.5e-3 * 256 / 2048),
    "cifar10": dict(model="vit_ti4", depth=6, vocab_size=512, batch_size=256, num_epochs=100.0,
                    warmup_epochs=5.0, base_lr=1e-3),
    "digits": dict(model="vit_ti2", depth=4, vocab_size=128, batch_size=128, num_epochs=100.0,
                   warmup_epochs=10.0, base_lr=1.5e-3),
}
VIT_OPTIONS = dict(pos_embed="none", rel_pos_bias=True, use_mask_token=True, layer_scale_init=0.1,
                   drop_path_rate=0.1, pool_type="mean", init_scheme="beit")


def get_config(arg=None):
    arg = parse_arg(arg, data="digits", model="", runlocal=False)
    config = presets.base_config("beit", arg.data)
    data = DATA[arg.data]
    crop = config.aug.view1.size
    view = presets.view_config(size=crop, crop_scale=(0.08, 1.0), flip=True, color_jitter=1.0,
                               brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0,
                               color_jitter_p=1.0, grayscale_p=0.0, blur_p=0.0)
    config.aug = dict(view1=view, view2=view)  # view2 is unused; kept for the shared keys
    # The paper's ImageNet recipe (ViT-B/16): 75 of 196 patches masked in blocks of >= 16
    # patches with aspect ratios 0.3-1/0.3, V=8192 visual tokens of the dVAE at tokenizer_workdir.
    config.beit = dict(tokenizer_workdir="", vocab_size=8192, mask_ratio=75 / 196 + 1e-6,
                       min_block_patches=16, min_aspect=0.3)
    config.beit.vocab_size = data["vocab_size"]
    config.batch_size = data["batch_size"]
    config.num_epochs = data["num_epochs"]
    config.optim.update(name="adamw", base_lr=data["base_lr"], lr_scaling="linear",
                        warmup_epochs=data["warmup_epochs"], b1=0.9, b2=0.999, weight_decay=0.05,
                        grad_clip_norm=3.0)
    if arg.data == "imagenet2012":  # run_beit_pretraining.py's --min_lr 1e-5
        config.optim.end_lr_factor = 1e-5 / (data["base_lr"] * data["batch_size"] / 256)
    vit_kw = {"depth": data["depth"]} if data["depth"] and not arg.model else {}
    presets.set_model(config, arg.model or data["model"], **VIT_OPTIONS, **vit_kw)

    if arg.data != "imagenet2012":  # 8x8 grids: 40% of 64 patches, blocks of >= 4 patches
        config.beit.update(mask_ratio=0.4, min_block_patches=4)
    if arg.data == "cifar10":
        config.data.num_workers = 2
    elif arg.data == "digits":
        view.update(crop_scale=(0.5, 1.0), color_jitter=0.0, color_jitter_p=0.0)
        config.aug.view1 = view
        config.log_every = 20
        config.checkpoint.every_steps = 500

    if arg.runlocal:
        presets.shrink_for_runlocal(config)  # 16-px views at patch 2: the 8x8 grid of the
        presets.set_model(config, "vit_ti2", depth=2, **VIT_OPTIONS)  # dVAE's runlocal preset
        config.beit.vocab_size = 16  # as configs/dvae.py:runlocal
    config.lock()
    return config

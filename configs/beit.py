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

Common recipe (the paper's, Sec. 2 and Appendix): the ViT's view and the tokenizer's view are the
same random resized crop (scale 0.08-1), flip and colour jitter 0.4/0.4/0.4 (always applied, no
hue) at two sizes; blockwise masking of about 40% of the patches (blocks of at least 16 patches
on ImageNet, aspect ratio 0.3-1/0.3); a ViT with a learned mask token, a relative position bias
shared by the blocks, no absolute position embedding, layer scale 0.1 and stochastic depth 0.1;
a linear head over the V tokens, trained with cross-entropy at masked positions only; AdamW
(0.9, 0.999) with LR 1.5e-3 at batch 2048 (1.875e-4 x B/256), weight decay 0.05, 10 warm-up
epochs, cosine, gradient clipping 3.0. Linear probe and kNN use the mean of the patch tokens.

- imagenet2012: ViT-B/16 on 224-px views, tokenizer on 112 px (14x14 tokens, V=8192), 75 of 196
  patches masked, batch 2048, 800 epochs.
- cifar10: ViT-Ti width at patch 4 with 6 blocks on 32-px views (8x8 grid; ``model=vit_ti4`` for
  12 blocks), V=512, 25 of 64 patches masked in blocks of at least 4, batch 256, 100 epochs,
  5 warm-up epochs, LR 1e-3 x B/256 (CPU-sized; the full schedule is for an accelerator).
- digits: the built-in 16-px digits at patch 2 (8x8 grid), ViT-Ti width with 4 blocks, V=128,
  25 of 64 patches masked in blocks of at least 4, batch 128, 100 epochs, 10 warm-up epochs,
  LR 1.5e-3 x B/256, crops of scale 0.5-1 without colour jitter (grey digits).
"""

from ssl_jax import presets
from ssl_jax.config import parse_arg
from ssl_jax.data import augment
from ssl_jax.methods.beit import beit_config

DATA = {  # model, vocabulary, batch, epochs, warm-up epochs, base LR (x B/256)
    "imagenet2012": ("vit_b16", 8192, 2048, 800.0, 10.0, 1.5e-3 * 256 / 2048),
    "cifar10": ("vit_ti4", 512, 256, 100.0, 5.0, 1e-3),
    "digits": ("vit_ti2", 128, 128, 100.0, 10.0, 1.5e-3),
}
VIT_OPTIONS = dict(pos_embed="none", rel_pos_bias=True, use_mask_token=True, layer_scale_init=0.1,
                   drop_path_rate=0.1, pool_type="mean")


def get_config(arg=None):
    arg = parse_arg(arg, data="digits", model="", runlocal=False)
    config = presets.base_config("beit", arg.data)
    model, vocab, batch, epochs, warmup, base_lr = DATA[arg.data]
    crop = config.aug.view1.size
    view = augment.view_config(size=crop, crop_scale=(0.08, 1.0), flip=True, color_jitter=1.0,
                               brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0,
                               color_jitter_p=1.0, grayscale_p=0.0, blur_p=0.0)
    config.aug = dict(view1=view, view2=view)  # view2 is unused; kept for the shared keys
    config.beit = beit_config(vocab_size=vocab)
    config.batch_size = batch
    config.num_epochs = epochs
    config.optim.update(name="adamw", base_lr=base_lr, lr_scaling="linear", warmup_epochs=warmup,
                        b1=0.9, b2=0.999, weight_decay=0.05, grad_clip_norm=3.0)
    depth = {"digits": 4, "cifar10": 6}.get(arg.data)  # CPU-sized defaults; ImageNet: ViT-B's
    vit_kw = {"depth": depth} if depth and not arg.model else {}
    presets.set_model(config, arg.model or model, **VIT_OPTIONS, **vit_kw)

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

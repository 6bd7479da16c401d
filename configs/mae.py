r"""MAE (He et al. 2022): masked autoencoder pre-training of a ViT.

    python -m ssl_jax.train --config configs/mae.py:data=digits --workdir /tmp/mae
    python -m ssl_jax.evaluate --workdir /tmp/mae      # linear (MAE's BN protocol) + kNN
    python -m ssl_jax.finetune --workdir /tmp/mae      # MAE's headline: end-to-end fine-tuning
    python -m ssl_jax.train --config configs/mae.py:data=cifar10 --workdir /tmp/mae_c10 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10
    python -m ssl_jax.train --config configs/mae.py:data=imagenet2012 ...

Presets (``arg``): ``data=digits|cifar10|imagenet2012``, ``model=vit_b16|vit_ti4|...`` (default
per dataset), ``mask=random|block|grid`` (the paper's ablation; default random), ``runlocal``.

Common recipe (the paper's): 75% of the patches masked per example, the encoder sees only the
visible ones, fixed 2-D sin-cos position embeddings in encoder and decoder, loss on the masked
patches of per-patch normalised pixels (``norm_pix_loss``), augmentation = random resized crop
of scale 0.2-1 and flip only, AdamW (b1 0.9, b2 0.95) with LR 1.5e-4 x B/256, weight decay
0.05 (not on biases, norms, tokens), linear warm-up then cosine. The evaluation job's linear
probe uses MAE's BatchNorm without affine parameters before the classifier.

- imagenet2012: ViT-B/16, decoder 8 blocks of width 512 (16 heads), batch 4096, 800 epochs
  (the paper runs 800-1600), 40 warm-up epochs.
- cifar10: ViT-Ti width at patch 4 with 6 blocks (192 wide, 3 heads; an 8x8 grid, 16 visible
  patches; ``model=vit_ti4`` for all 12 blocks), decoder 2 blocks of width 128 (4 heads), batch
  256, 200 epochs, 10 warm-up epochs: sized so that a few epochs fit in an hour on 2 CPU cores
  (about 160 images/s there); the full schedule is for an accelerator.
- digits: the built-in 16-px digits at patch 2 (each patch is one pixel of the original 8x8
  digit; an 8x8 grid, 16 visible patches), ViT-Ti width with 4 blocks, decoder 2 blocks of width
  128 (4 heads), batch 128, 150 epochs (1,700 steps), 10 warm-up epochs, LR 1.5e-3 x B/256 (the
  paper's 1.5e-4 is tuned for 1,000x more steps).
"""

from ssl_jax import presets
from ssl_jax.config import parse_arg
from ssl_jax.data import augment
from ssl_jax.methods.mae import mae_config

DATA = {  # model, batch, epochs, warm-up epochs
    "imagenet2012": ("vit_b16", 4096, 800.0, 40.0),
    "cifar10": ("vit_ti4", 256, 200.0, 10.0),
    "digits": ("vit_ti2", 128, 150.0, 10.0),
}


def get_config(arg=None):
    arg = parse_arg(arg, data="digits", model="", mask="random", runlocal=False)
    config = presets.base_config("mae", arg.data)
    model, batch, epochs, warmup = DATA[arg.data]
    crop = config.aug.view1.size
    view = augment.view_config(size=crop, crop_scale=(0.2, 1.0), flip=True, color_jitter=0.0,
                               color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    config.aug = dict(view1=view, view2=view)  # view2 is unused; kept for the shared keys
    config.mae = mae_config(mask_kind=arg.mask)
    config.batch_size = batch
    config.num_epochs = epochs
    config.optim.update(name="adamw", base_lr=1.5e-4, lr_scaling="linear", warmup_epochs=warmup,
                        b1=0.9, b2=0.95, weight_decay=0.05, grad_clip_norm=0.0)
    config.eval.probe_normalize = "batchnorm"  # MAE's BatchNorm1d(affine=False) protocol
    depth = {"digits": 4, "cifar10": 6}.get(arg.data)  # CPU-sized defaults; ImageNet: ViT-B's
    vit_kw = {"depth": depth} if depth and not arg.model else {}
    presets.set_model(config, arg.model or model, pos_embed="sincos", **vit_kw)

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

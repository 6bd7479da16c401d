r"""Discrete VAE (DALL-E's stage 1, Ramesh et al. 2021): the visual tokenizer BEiT predicts.

    python -m ssl_jax.train --config configs/dvae.py:data=digits --workdir /tmp/tok
    python -m ssl_jax.evaluate --workdir /tmp/tok     # linear + kNN on the encoder's features,
                                                      # hard-code reconstruction MSE, code usage
    python -m ssl_jax.train --config configs/dvae.py:data=cifar10 --workdir /tmp/tok_c10 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10
    python -m ssl_jax.train --config configs/dvae.py:data=imagenet2012 ...

Presets (``arg``): ``data=digits|cifar10|imagenet2012``, ``runlocal``.

Common recipe (DALL-E's, scaled down): an encoder of ``num_downsample`` stride-2 stages to a
``g x g`` grid of logits over ``V`` tokens, the Gumbel-softmax relaxation with the temperature
annealed (cosine) from 1 to 1/16, a KL term to the uniform prior whose weight warms up (cosine)
from 0, MSE reconstruction of the normalised image, augmentation = random resized crop and flip
only, AdamW (b1 0.9, b2 0.999, weight decay 1e-4 as DALL-E) with linear warm-up then cosine.
KL weight 0.01 for every preset: the loss averages the squared error over pixel values and the
KL over grid cells, so DALL-E's 6.6 (on its own normalisation) does not carry over; 0.01 was
chosen on digits without a sweep (at the end of that run the KL term is about half the loss:
0.033 of 0.066). ``straight_through`` stays off as in DALL-E (on digits it gave a slightly
worse hard-code reconstruction on the test split, MSE 0.037 vs 0.033).
The grid matches the patch grid of the BEiT ViT that uses the tokens:

- imagenet2012: 112-px input (BEiT's tokenizer sees its 224-px crop at half size), 3 stages ->
  14x14 grid (ViT patch 16 on 224 px), V=8192, widths 128/256/512/1024 with 2 residual blocks
  per group, codebook dim 128 (DALL-E's decoder input width), crops of scale 0.08-1 (BEiT's),
  batch 512, 100 epochs (250k steps), LR 2e-4 x B/256, temperature annealed over the first 60%
  (150k steps, as DALL-E), KL weight warmed up over the first 2% (5k steps, as DALL-E). Not yet
  measured.
- cifar10: 32 px, 2 stages -> 8x8 grid (ViT patch 4), V=512, widths 64/128/256, 1 residual
  block per group, batch 128, 100 epochs. Not yet measured.
- digits: the built-in 16-px digits, 1 stage -> 8x8 grid (ViT patch 2; each token covers one
  pixel of the original 8x8 digit), V=128, widths 32/64, 1 residual block per group, batch 128,
  60 epochs (660 steps, about 4 minutes on 2 CPU cores), LR 3e-3 x B/256 (DALL-E's 1e-4 is
  tuned for 3M steps). The smaller models' LRs are 10x+ DALL-E's for their 1,000x shorter runs.
"""

from ssl_jax import presets
from ssl_jax.config import parse_arg
from ssl_jax.data import augment
from ssl_jax.methods.dvae import dvae_config

DATA = {  # tokenizer input px, crop scale, batch, epochs, warm-up epochs, base LR (at 256)
    "imagenet2012": (112, (0.08, 1.0), 512, 100.0, 1.0, 2e-4),
    "cifar10": (32, (0.2, 1.0), 128, 100.0, 2.0, 2e-3),
    "digits": (16, (0.2, 1.0), 128, 60.0, 5.0, 3e-3),
}
MODEL = {  # config.dvae architecture keys per dataset
    "imagenet2012": dict(vocab_size=8192, hidden_dim=128, codebook_dim=128, num_downsample=3,
                         num_res_blocks=2),
    "cifar10": dict(vocab_size=512, hidden_dim=64, codebook_dim=64, num_downsample=2,
                    num_res_blocks=1),
    "digits": dict(vocab_size=128, hidden_dim=32, codebook_dim=32, num_downsample=1,
                   num_res_blocks=1),
}


def get_config(arg=None):
    arg = parse_arg(arg, data="digits", runlocal=False)
    config = presets.base_config("dvae", arg.data)
    size, scale, batch, epochs, warmup, lr = DATA[arg.data]
    view = augment.view_config(size=size, crop_scale=scale, flip=True, color_jitter=0.0,
                               color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    config.aug = dict(view1=view, view2=view)  # view2 is unused; kept for the shared keys
    config.dvae = dvae_config(**MODEL[arg.data])
    config.batch_size = batch
    config.num_epochs = epochs
    config.optim.update(name="adamw", base_lr=lr, lr_scaling="linear", warmup_epochs=warmup,
                        b1=0.9, b2=0.999, weight_decay=1e-4, end_lr_factor=0.01)
    # The run's identity for the workdir check and the evaluation's tables; the architecture
    # itself is config.dvae.
    config.model = dict(name="dvae")

    if arg.data == "cifar10":
        config.data.num_workers = 2
    elif arg.data == "digits":
        config.log_every = 20
        config.checkpoint.every_steps = 500

    if arg.runlocal:
        presets.shrink_for_runlocal(config)  # sets a ViT as config.model: put the dVAE back
        config.model = dict(name="dvae")
        config.dvae.update(vocab_size=16, hidden_dim=8, codebook_dim=8, num_res_blocks=1)
    config.lock()
    return config

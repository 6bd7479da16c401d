r"""Discrete VAE (DALL-E's stage 1, Ramesh et al. 2021): the visual tokenizer BEiT predicts.

    python -m ssl_jax.train --config configs/dvae.py:data=digits --workdir /tmp/tok
    python -m ssl_jax.evaluate --workdir /tmp/tok     # linear + kNN on the encoder's features,
                                                      # hard-code reconstruction MSE, code usage
    python -m ssl_jax.train --config configs/dvae.py:data=cifar10 --workdir /tmp/tok_c10 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10
    python -m ssl_jax.train --config configs/dvae.py:data=imagenet2012 ...

Presets (``arg``): ``data=digits|cifar10|imagenet2012``, ``runlocal``.

Recipes (the details and why: docs/recipes.md, "dVAE"):
- data=imagenet2012: DALL-E's recipe at BEiT's 112-px tokenizer input: 14x14 tokens, V=8192.
- data=cifar10: 32 px, 2 stages to an 8x8 grid (ViT patch 4), V=512; not yet measured.
- data=digits: the built-in 16-px digits, 1 stage to an 8x8 grid, V=128, ~4 min on 2 CPU cores.
"""

from ssl_jax import presets
from ssl_jax.config import parse_arg

DATA = {  # image_size: the tokenizer's input px; base_lr is per 256 examples (x B/256)
    "imagenet2012": dict(image_size=112, crop_scale=(0.08, 1.0), batch_size=512,
                         num_epochs=100.0, warmup_epochs=1.0, base_lr=2e-4),
    "cifar10": dict(image_size=32, crop_scale=(0.2, 1.0), batch_size=128, num_epochs=100.0,
                    warmup_epochs=2.0, base_lr=2e-3),
    "digits": dict(image_size=16, crop_scale=(0.2, 1.0), batch_size=128, num_epochs=60.0,
                   warmup_epochs=5.0, base_lr=3e-3),
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
    data = DATA[arg.data]
    view = presets.view_config(size=data["image_size"], crop_scale=data["crop_scale"], flip=True,
                               color_jitter=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    config.aug = dict(view1=view, view2=view)  # view2 is unused; kept for the shared keys
    # DALL-E's recipe at BEiT's ImageNet tokenizer input: 3 stride-2 stages to a 14x14 grid over
    # V=8192 tokens, Gumbel-softmax temperature 1 -> 1/16 over the first 60% of the steps, KL
    # weight 0.01 warmed up over the first 2%, no straight-through estimator.
    config.dvae = dict(
        vocab_size=8192, hidden_dim=128, codebook_dim=128, num_downsample=3, num_res_blocks=2,
        dtype="float32", temperature_start=1.0, temperature_end=1.0 / 16,
        temperature_anneal_fraction=0.6, kl_weight=0.01, kl_warmup_fraction=0.02,
        straight_through=False)
    config.dvae.update(MODEL[arg.data])
    config.batch_size = data["batch_size"]
    config.num_epochs = data["num_epochs"]
    config.optim.update(name="adamw", base_lr=data["base_lr"], lr_scaling="linear",
                        warmup_epochs=data["warmup_epochs"], b1=0.9, b2=0.999, weight_decay=1e-4,
                        end_lr_factor=0.01)
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

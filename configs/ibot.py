r"""iBOT (Zhou et al. 2022): DINO's self-distillation plus masked patch-token distillation.

    python -m ssl_jax.train --config configs/ibot.py:data=digits --workdir /tmp/ibot
    python -m ssl_jax.evaluate --workdir /tmp/ibot      # linear + kNN + attention maps (teacher)
    python -m ssl_jax.train --config configs/ibot.py:data=cifar10 --workdir /tmp/ibot_c10 \
        --config.data.root=$HOME/.cache/ssl_jax/cifar10
    python -m ssl_jax.train --config configs/ibot.py:data=imagenet2012 ...

Presets (``arg``): ``data=digits|cifar10|imagenet2012``, ``model=vit_s16|vit_ti4|...`` (a ViT:
iBOT needs patch tokens; default per dataset), ``local_crops=N`` (default per dataset; 0 widens
the global crops' scale to 0.14-1, as main_ibot.py recommends), ``runlocal`` (a smoke test).

Recipes (the details and why: docs/recipes.md, "iBOT"):
- data=imagenet2012: the README's ViT-S/16 command (batch 1024, 2x224 + 10x96 px crops, 800
  epochs, K=8192 with a shared head, teacher T 0.04 -> 0.07 for cls and patch tokens, masks on
  half of the global crops covering 10-50% of the patches, norm_last_layer False).
- data=cifar10: DINO's CIFAR-10 budget and ViT (6-block ViT-Ti/4, 6 local crops, 200 epochs,
  K=4096) with iBOT's crop scales and masking on the 8x8 grid.
- data=digits: DINO's digits recipe (views without colour, teacher T 0.04) on a 4-block ViT-Ti/4,
  45 epochs (at 15 the teacher is still near uniform).
- Initial weights: DINO's on ImageNet, MAE's on CIFAR-10 and digits (measured; see below).
"""

from ssl_jax import presets

DATA = {
    "imagenet2012": dict(global_size=224, local_size=96, local_crops=10, model="vit_s16",
                         batch_size=1024, num_epochs=800.0),
    "cifar10": dict(global_size=32, local_size=16, local_crops=6, model="vit_ti4",
                    batch_size=256, num_epochs=200.0),
    "digits": dict(global_size=16, local_size=8, local_crops=0, model="vit_ti4",
                   batch_size=64, num_epochs=45.0),
}


def get_config(arg=None):
    from ssl_jax.config import parse_arg

    arg = parse_arg(arg, data="digits", model="", local_crops=-1, runlocal=False)
    config = presets.base_config("ibot", arg.data)
    data = DATA[arg.data]
    num_local = data["local_crops"] if arg.local_crops < 0 else arg.local_crops
    global_scale = (0.25, 1.0) if num_local else (0.14, 1.0)
    # iBOT's DataAugmentationiBOT is DINO's, with its own scales.
    config.aug = presets.dino_multicrop(data["global_size"], global_scale, data["local_size"],
                                        (0.05, 0.25), num_local)
    # The README's ViT-S/16 command over main_ibot.py's defaults: head 2048-2048-256 to K=8192
    # shared by the cls and patch tokens, student temperature 0.1, teacher 0.04 -> 0.07 over 30
    # epochs for both, centre momenta 0.9, teacher momentum 0.996 -> 1, loss weights 1 and 1,
    # masks (--pred_ratio 0 0.3 --pred_ratio_var 0 0.2) on half of the global crops, blocks of
    # at least (14 // 3)^2 = 16 patches with aspect ratios 0.3-1/0.3.
    config.ibot = dict(
        out_dim=8192, patch_out_dim=8192, shared_head=True, hidden_dim=2048, bottleneck_dim=256,
        head_layers=3, head_bn=False, norm_last_layer=False, student_temp=0.1,
        teacher_temp=0.07, warmup_teacher_temp=0.04, teacher_patch_temp=0.07,
        warmup_teacher_patch_temp=0.04, warmup_teacher_temp_epochs=30.0, center_momentum=0.9,
        patch_center_momentum=0.9, momentum_teacher=0.996, cls_loss_weight=1.0,
        patch_loss_weight=1.0, mask_ratio=(0.1, 0.5), mask_prob=0.5, min_block_patches=16,
        min_aspect=0.3)
    config.batch_size = data["batch_size"]
    config.num_epochs = data["num_epochs"]
    # main_ibot.py: AdamW, LR 5e-4 x B/256 after 10 warm-up epochs, cosine to 1e-6, weight
    # decay 0.04 -> 0.4 (cosine), per-parameter clipping at 3, last layer(s) frozen 1 epoch.
    config.optim.update(
        name="adamw", base_lr=0.0005, lr_scaling="linear", warmup_epochs=10.0, b1=0.9, b2=0.999,
        weight_decay=0.04, weight_decay_end=0.4, grad_clip_norm=3.0,
        grad_clip_kind="per_parameter", freeze=(("head/last_layer", 1.0),),
        end_lr_factor=1e-6 / (0.0005 * data["batch_size"] / 256))
    model = arg.model or data["model"]
    # ImageNet: the official code's initial weights (DINO's). The small-data presets start from
    # MAE's (Xavier-uniform), as lightly's iBOT example does: on CIFAR-10 at one epoch that was
    # +2.4 / +1.8 points linear / kNN over DINO's, and +10.5 / +17.0 on digits
    # (docs/benchmarks/simmim_ibot.md, "iBOT's initial weights").
    init = "dino" if arg.data == "imagenet2012" else "mae"
    vit = dict(init_scheme=init, use_mask_token=True, drop_path_rate=0.1)

    if arg.data == "imagenet2012":
        presets.set_model(config, model, **vit)
    elif arg.data == "cifar10":  # DINO's CIFAR-10 ViT and head; an 8x8 grid: blocks >= 4
        presets.set_model(config, model, **vit, **({} if arg.model else {"depth": 6}))
        config.ibot.update(out_dim=4096, patch_out_dim=4096, hidden_dim=1024,
                           min_block_patches=4)
        config.data.num_workers = 2
    else:  # digits: DINO's digits preset with a ViT; a 4x4 grid: blocks >= 1
        presets.set_model(config, model, **vit, **({} if arg.model else {"depth": 4}))
        presets.dino_digits_views(config.aug)
        config.ibot.update(out_dim=1024, patch_out_dim=1024, hidden_dim=512, bottleneck_dim=128,
                           head_bn=True, warmup_teacher_temp=0.04, teacher_temp=0.04,
                           warmup_teacher_patch_temp=0.04, teacher_patch_temp=0.04,
                           warmup_teacher_temp_epochs=0.0, momentum_teacher=0.99,
                           min_block_patches=1)
        config.optim.update(base_lr=0.002, warmup_epochs=2.0,
                            end_lr_factor=1e-6 / (0.002 * data["batch_size"] / 256))
        config.log_every = 10
        config.checkpoint.every_steps = 100

    if arg.runlocal:
        presets.shrink_for_runlocal(config)  # 16-px global crops, a 2-block ViT-Ti/4: 4x4 grid
        presets.set_model(config, config.model.name, depth=2, **vit)
        config.aug.local.size = min(config.aug.local.size, 8)
        config.aug.num_local_crops = min(config.aug.num_local_crops, 2)
        config.ibot.update(out_dim=64, patch_out_dim=64, hidden_dim=64, bottleneck_dim=32,
                           warmup_teacher_temp_epochs=0.0, min_block_patches=1)
        config.optim.freeze = (("head/last_layer", 0.0),)
    config.lock()
    return config

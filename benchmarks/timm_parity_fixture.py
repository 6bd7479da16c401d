"""Writes ``tests/fixtures/timm_parity/``: small timm models with random weights, an input batch
and timm's outputs for it, so that the tests check the conversions against timm on every run
without torch (``tests/test_convert.py``).

Run once, with torch and timm installed (not needed by the project)::

    python benchmarks/timm_parity_fixture.py [OUT_DIR]

Per model: ``<name>.safetensors`` (timm's ``state_dict``, float32); in ``expected.npz``:
``<name>/input`` (``[2, 3, H, W]`` float32, NCHW), ``<name>/features`` (``model(x)`` with
``num_classes=0``: the pooled features) and, for ViTs, ``<name>/tokens``
(``forward_features(x)``: every token after the final norm); ``specs.json``: the timm model
name, kwargs and patch lines each was built with, the project's model config that holds the
same network, and the torch / timm versions. Every parameter and BatchNorm statistic is drawn
at random (LayerNorm, BatchNorm and LayerScale weights too, so that a swapped or misplaced
tensor changes the outputs).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import timm
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "timm_parity")

# name -> (timm model name, kwargs, patch lines run on `model`, the project's model config,
# input side). The patch lines are those ssl_jax.convert.timm_export writes for the same model
# (the tests compare them).
MODELS = {
    "vit_s16_like": (
        "vit_small_patch16_224",
        dict(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0,
             num_classes=0, init_values=0.1, class_token=True, qkv_bias=True,
             global_pool="token", fc_norm=False, pos_embed="learn", no_embed_class=False),
        [],
        dict(name="vit_s16", dim=48, depth=2, num_heads=3, layer_scale_init=0.1),
        32),
    "vit_s16_like_avg": (
        "vit_small_patch16_224",
        dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, mlp_ratio=4.0,
             num_classes=0, init_values=None, class_token=False, qkv_bias=True,
             global_pool="avg", fc_norm=False, pos_embed="learn", no_embed_class=False),
        [],
        dict(name="vit_s16", dim=32, depth=1, num_heads=2, use_cls_token=False,
             pool_type="mean"),
        32),
    "beit_like": (
        "beit_base_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0,
             num_classes=0, init_values=0.1, use_abs_pos_emb=False, use_rel_pos_bias=False,
             use_shared_rel_pos_bias=True, global_pool="avg", use_fc_norm=False),
        [],
        dict(name="vit_s8", dim=32, depth=2, num_heads=2, layer_scale_init=0.1,
             pos_embed="none", rel_pos_bias=True, pool_type="mean"),
        32),
    "resnet18_w8": (
        "resnet18",
        dict(num_classes=0, channels=[8, 16, 32, 64]),
        ["model.conv1 = torch.nn.Conv2d(3, 8, kernel_size=7, stride=2, padding=3, bias=False)",
         "model.bn1 = torch.nn.BatchNorm2d(8)",
         "model.layer1[0].conv1 = torch.nn.Conv2d(8, 8, kernel_size=3, padding=1, bias=False)",
         "model.layer1[0].downsample = None"],
        dict(name="resnet18", width_multiplier=0.125, cifar_stem=False),
        32),
    "resnet18_cifar_w4": (
        "resnet18",
        dict(num_classes=0, channels=[4, 8, 16, 32]),
        ["model.conv1 = torch.nn.Conv2d(3, 4, kernel_size=3, stride=1, padding=1, bias=False)",
         "model.maxpool = torch.nn.Identity()",
         "model.bn1 = torch.nn.BatchNorm2d(4)",
         "model.layer1[0].conv1 = torch.nn.Conv2d(4, 4, kernel_size=3, padding=1, bias=False)",
         "model.layer1[0].downsample = None"],
        dict(name="resnet18", width_multiplier=0.0625, cifar_stem=True),
        16),
}


def build(name: str) -> torch.nn.Module:
    timm_name, kwargs, patch, _, _ = MODELS[name]
    model = timm.create_model(timm_name, pretrained=False, **kwargs)
    for line in patch:
        exec(line, {"torch": torch, "model": model})  # the documented lines, verbatim
    return model


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter and BatchNorm statistic at random, of sensible magnitude."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 or "gamma" in name or "relative_position_bias_table" in name:
                base = 1.0 if p.ndim == 1 and name.endswith("weight") else 0.0  # norm scales
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p[0].numel()))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.2 * torch.randn(module.running_mean.shape,
                                                            generator=gen))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape,
                                                          generator=gen))


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    arrays, specs = {}, {"torch": torch.__version__, "timm": timm.__version__, "models": {}}
    for name, (timm_name, kwargs, patch, project_model, side) in MODELS.items():
        model = build(name)
        randomise(model, gen)
        model.eval()
        x = torch.randn(2, 3, side, side, generator=gen)
        with torch.no_grad():
            arrays[f"{name}/input"] = x.numpy()
            arrays[f"{name}/features"] = model(x).numpy()
            if "vit" in name or "beit" in name:
                arrays[f"{name}/tokens"] = model.forward_features(x).numpy()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(out, f"{name}.safetensors"))
        specs["models"][name] = {"model_name": timm_name, "kwargs": kwargs, "patch": patch,
                                 "project_model": project_model, "image_size": side}
    np.savez(os.path.join(out, "expected.npz"), **arrays)
    with open(os.path.join(out, "specs.json"), "w") as f:
        json.dump(specs, f, indent=2)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"wrote {out}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT)

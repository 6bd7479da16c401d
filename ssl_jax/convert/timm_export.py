"""An encoder as timm builds it: the model name and keyword arguments, and its ``state_dict``.

``timm.create_model(name, pretrained=False, **kwargs)`` then ``load_state_dict(tensors)`` loads
the exported tensors with no missing and no unexpected keys, and the model's output (``num_classes
=0``: the pooled features) is the project encoder's, in float32, for the same normalised images
(NCHW there, NHWC here).

- ViT -> timm's ``VisionTransformer`` (``vit_{tiny,small,base,large,huge}_*``; the kwargs set
  every size field, so the name only picks the class): ``global_pool='token'`` for the cls
  token, ``'avg'`` with ``fc_norm=False`` for the mean of the patch tokens after the final norm
  (the project's ``pool_type='mean'``); ``pos_embed='none'`` without position embeddings; a fixed
  sin-cos table becomes a learned ``pos_embed`` holding it (zero for the cls token, which gets
  none); the mask token (not used by the features) is left out.
- ViT with BEiT's shared relative position bias -> timm's ``Beit`` (``use_shared_rel_pos_bias``):
  its attention has ``q_bias`` and ``v_bias`` but no key bias, so the key bias is left out; it
  adds the same logit to every key of a query, which the softmax cancels (features equal to
  float rounding, not bit for bit).
- ResNet -> timm's ``ResNet`` (torchvision's names), ``channels`` the stage widths. timm's
  kwargs cannot express the CIFAR stem (a 3x3 stride-1 convolution, no max-pool) nor a stem
  narrower than 64 channels: the spec's ``patch`` lines replace those modules of the model
  from ``create_model`` before ``load_state_dict`` (:data:`CIFAR_STEM_PATCH`, two lines, for a
  full-width CIFAR ResNet; :data:`NARROW_STEM_PATCH` and :data:`NARROW_FIRST_BLOCK_PATCH` for
  ``width_multiplier < 1``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ssl_jax.convert import keymap
from ssl_jax.convert.files import WeightsError
from ssl_jax.models.resnet import ResNet
from ssl_jax.models.vit import ViT
from ssl_jax.models.vit_position import sincos_2d_pos_embed

TIMM_VIT_NAMES = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224",
                  768: "vit_base_patch16_224", 1024: "vit_large_patch16_224",
                  1280: "vit_huge_patch14_224"}
TIMM_BEIT_NAMES = {768: "beit_base_patch16_224", 1024: "beit_large_patch16_224"}
# timm builds a 7x7 stride-2 stem of 64 channels whatever the kwargs: the project's CIFAR stem
# (3x3, stride 1, no max-pool) and narrower ResNets (width_multiplier < 1: a stem of W < 64
# channels, so the first block needs no projection) are made by replacing these modules of the
# model from create_model, before load_state_dict.
CIFAR_STEM_PATCH = (
    "model.conv1 = torch.nn.Conv2d(3, {w}, kernel_size=3, stride=1, padding=1, bias=False)",
    "model.maxpool = torch.nn.Identity()",
)
NARROW_STEM_PATCH = (
    "model.conv1 = torch.nn.Conv2d(3, {w}, kernel_size=7, stride=2, padding=3, bias=False)",
    "model.bn1 = torch.nn.BatchNorm2d({w})",
)
NARROW_FIRST_BLOCK_PATCH = {
    "basic": ("model.layer1[0].conv1 = torch.nn.Conv2d({w}, {w}, kernel_size=3, padding=1, "
              "bias=False)", "model.layer1[0].downsample = None"),
    "bottleneck": ("model.layer1[0].conv1 = torch.nn.Conv2d({w}, {w}, kernel_size=1, bias=False)",
                   "model.layer1[0].downsample[0] = torch.nn.Conv2d({w}, {e}, kernel_size=1, "
                   "bias=False)"),
}


def timm_spec(module: Any) -> dict[str, Any]:
    """``{'model_name', 'kwargs', 'patch'}``: how timm builds ``module`` (``patch``: lines of
    Python to run on ``model`` after ``create_model``, empty unless needed)."""
    if isinstance(module, ResNet):
        return _resnet_spec(module)
    if isinstance(module, ViT):
        return _beit_spec(module) if module.rel_pos_bias else _vit_spec(module)
    raise WeightsError(f"the run's encoder is a {type(module).__name__}; only ViTs and ResNets "
                       "are exported to timm")


def _vit_common(m: ViT) -> dict[str, Any]:
    return dict(img_size=m.image_size, patch_size=m.patch_size, embed_dim=m.dim, depth=m.depth,
                num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, num_classes=0,
                init_values=m.layer_scale_init)


def _pooled_by_mean(m: ViT) -> bool:
    return m.pool_type == "mean" or not m.use_cls_token


def _vit_spec(m: ViT) -> dict[str, Any]:
    kwargs = {**_vit_common(m), "class_token": m.use_cls_token, "qkv_bias": True,
              "global_pool": "avg" if _pooled_by_mean(m) else "token", "fc_norm": False,
              "pos_embed": "none" if m.pos_embed == "none" else "learn", "no_embed_class": False}
    name = TIMM_VIT_NAMES.get(m.dim, "vit_small_patch16_224")
    return {"model_name": name, "kwargs": kwargs, "patch": []}


def _beit_spec(m: ViT) -> dict[str, Any]:
    if not m.use_cls_token:
        raise WeightsError("timm's Beit always has a cls token; a ViT with a relative position "
                           "bias and no cls token is not exported")
    kwargs = {**_vit_common(m), "use_abs_pos_emb": m.pos_embed != "none",
              "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True,
              "global_pool": "avg" if _pooled_by_mean(m) else "token", "use_fc_norm": False}
    name = TIMM_BEIT_NAMES.get(m.dim, "beit_base_patch16_224")
    return {"model_name": name, "kwargs": kwargs, "patch": []}


def _resnet_spec(m: ResNet) -> dict[str, Any]:
    depth = {(2, 2, 2, 2, "basic"): 18, (3, 4, 6, 3, "basic"): 34, (3, 4, 6, 3, "bottleneck"): 50,
             (3, 4, 23, 3, "bottleneck"): 101, (3, 8, 36, 3, "bottleneck"): 152}.get(
                 (*tuple(m.stage_sizes), m.block))
    if depth is None:
        raise WeightsError(f"a ResNet with stages {tuple(m.stage_sizes)} is none of timm's")
    w = m.stage_widths[0]
    kwargs = {"num_classes": 0, "channels": list(m.stage_widths)}
    patch = list(CIFAR_STEM_PATCH) if m.cifar_stem else []
    if w != 64:
        patch = ([] if m.cifar_stem else [NARROW_STEM_PATCH[0]]) + patch + [NARROW_STEM_PATCH[1]]
        patch += NARROW_FIRST_BLOCK_PATCH[m.block]
    patch = [line.format(w=w, e=4 * w) for line in patch]
    return {"model_name": f"resnet{depth}", "kwargs": kwargs, "patch": patch}


def timm_tensors(module: Any, variables: Any) -> dict[str, np.ndarray]:
    """The ``state_dict`` timm's model of :func:`timm_spec` loads: float32 tensors in PyTorch's
    layout (plus ``num_batches_tracked`` counters, int64 zeros, beside BatchNorm statistics)."""
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    if isinstance(module, ResNet):
        tensors = keymap.to_torch(variables, keymap.RESNET_RENAMES)
        for name in [k for k in tensors if k.endswith(".running_mean")]:
            tensors[name.replace("running_mean", "num_batches_tracked")] = np.zeros((), np.int64)
        return tensors
    if not isinstance(module, ViT):
        raise WeightsError(f"the run's encoder is a {type(module).__name__}; only ViTs and "
                           "ResNets are exported to timm")
    tensors = keymap.to_torch(variables, keymap.VIT_RENAMES)
    tensors.pop("mask_token", None)
    if module.pos_embed == "sincos":
        table = sincos_2d_pos_embed(module.dim, module.grid_size)[None]
        prefix = np.zeros((1, module.num_prefix_tokens, module.dim), np.float32)
        tensors["pos_embed"] = np.concatenate([prefix, table], axis=1)
    return _beit_names(tensors) if module.rel_pos_bias else tensors


def _beit_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm ViT names -> timm Beit names: ``ls{1,2}.gamma`` -> ``gamma_{1,2}``, ``qkv.bias`` ->
    ``q_bias`` and ``v_bias`` (the key bias left out: see the module docstring)."""
    out = {}
    for name, value in tensors.items():
        if name.endswith(".attn.qkv.bias"):
            block = name[: -len(".qkv.bias")]
            q, _, v = np.split(value, 3)
            out[f"{block}.q_bias"], out[f"{block}.v_bias"] = q.copy(), v.copy()
        elif name.endswith((".ls1.gamma", ".ls2.gamma")):
            out[name.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")] = value
        else:
            out[name] = value
    return out


def loading_snippet(spec: dict[str, Any], path: str) -> str:
    """Python that builds the timm model and loads the exported file (printed by the export)."""
    lines = ["import timm, torch", "from safetensors.torch import load_file",
             f"model = timm.create_model({spec['model_name']!r}, pretrained=False, "
             f"**{spec['kwargs']!r})", *spec["patch"],
             f"model.load_state_dict(load_file({path!r}))  # strict: no missing or unexpected keys",
             "model.eval()  # model(images) -> [batch, features]"]
    return "\n".join(lines)

"""The model a file holds, and a file's encoder tensors fitted to the config's encoder.

:func:`infer_model` reads the architecture off the tensors' names and shapes (``config.model``
fields: ViT width, depth, patch, cls token, position embedding, layer scale, relative position
bias; ResNet depth, width, stem). :func:`load_encoder` checks the file against the config's
encoder (the first mismatching key is named with both shapes), resamples learned position
embeddings to the config's patch grid (bicubic, as the ViT does for other input sizes), and
gives the encoder's variables.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax.convert import keymap
from ssl_jax.convert.files import WeightsError
from ssl_jax.models.resnet import RESNET_DEPTHS, ResNet, scaled_width
from ssl_jax.models.vit import VIT_SIZES, ViT
from ssl_jax.models.vit_position import resize_pos_embed, sincos_2d_pos_embed
from ssl_jax.presets import MODEL_DEFAULTS

# Fields of config.model a file determines (the others, e.g. dtype, pool_type, use_mask_token,
# drop_path_rate and init_scheme, stay the config's).
VIT_ARCH_FIELDS = ("name", "dim", "depth", "num_heads", "mlp_ratio", "use_cls_token",
                   "pos_embed", "rel_pos_bias", "layer_scale_init")
RESNET_ARCH_FIELDS = ("name", "width_multiplier", "cifar_stem")
# Parameters a method adds to the encoder that a file of another method may lack: kept as
# initialised (they take no part in the features).
NEW_IF_MISSING = ("mask_token",)


def renames(module: Any) -> keymap.Renames:
    """The key map of an encoder module."""
    if isinstance(module, ViT):
        return keymap.VIT_RENAMES
    if isinstance(module, ResNet):
        return keymap.RESNET_RENAMES
    raise WeightsError(f"the config's encoder is a {type(module).__name__}, not a ViT or ResNet: "
                       "only those are converted")


def abstract_variables(module: Any, image_size: int) -> Any:
    """The encoder's variables as shape structs (nothing is computed)."""
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))


# --- The file's architecture ---------------------------------------------------------------------


def infer_model(tensors: dict[str, np.ndarray], num_heads: int = 0) -> dict[str, Any]:
    """The ``config.model`` architecture fields of the encoder in ``tensors`` (timm names).
    ``num_heads`` is needed for a ViT whose width is none of Ti/S/B/L/H's (heads cannot be read
    off the weights)."""
    if "patch_embed.proj.weight" in tensors:
        return _infer_vit(tensors, num_heads)
    if "conv1.weight" in tensors and "layer1.0.conv1.weight" in tensors:
        return _infer_resnet(tensors)
    raise WeightsError("the file's encoder is neither a ViT (no patch_embed.proj.weight) nor a "
                       "ResNet (no conv1.weight, layer1.0.conv1.weight); first keys: "
                       + ", ".join(list(tensors)[:8]))


def _infer_vit(t: dict[str, np.ndarray], num_heads: int) -> dict[str, Any]:
    dim, _, patch, _ = t["patch_embed.proj.weight"].shape
    depth = len({m.group(1) for k in t if (m := re.match(r"blocks\.(\d+)\.", k))})
    size = next((s for s, (d, _, _) in VIT_SIZES.items() if d == dim), None)
    if not num_heads and size is None:
        raise WeightsError(
            f"the file's ViT has width {dim}, none of the standard widths "
            f"{ {s: d for s, (d, _, _) in VIT_SIZES.items()} }, so its number of attention heads "
            "cannot be read off the weights: pass --num_heads")
    heads = num_heads or VIT_SIZES[size][2]
    model: dict[str, Any] = {"name": f"vit_{size or 's'}{patch}"}
    if size is None or (depth, heads) != VIT_SIZES[size][1:]:
        model.update(dim=int(dim), depth=depth, num_heads=int(heads))
    if depth and "blocks.0.mlp.fc1.weight" in t:
        ratio = t["blocks.0.mlp.fc1.weight"].shape[0] / dim
        if ratio != 4.0:
            model["mlp_ratio"] = float(ratio)
    if "cls_token" not in t:
        model["use_cls_token"] = False
    rel = "rel_pos_bias.relative_position_bias_table" in t
    model["pos_embed"] = "learned" if "pos_embed" in t else "none"
    if rel:
        model["rel_pos_bias"] = True
    if "blocks.0.ls1.gamma" in t:
        model["layer_scale_init"] = 0.1  # an initial value only: the trained gammas are read
    return model


def _infer_resnet(t: dict[str, np.ndarray]) -> dict[str, Any]:
    stages = tuple(len({m.group(1) for k in t if (m := re.match(rf"layer{i}\.(\d+)\.", k))})
                   for i in range(1, 5))
    block = "bottleneck" if "layer1.0.conv3.weight" in t else "basic"
    depth = next((d for d, (sizes, kind) in RESNET_DEPTHS.items()
                  if sizes == stages and kind == block), None)
    if depth is None:
        raise WeightsError(f"the file's ResNet has {stages} {block} blocks per stage, none of "
                           f"the depths {sorted(RESNET_DEPTHS)}")
    stem = t["conv1.weight"]
    width, kernel = stem.shape[0], stem.shape[-1]
    if kernel not in (3, 7):
        raise WeightsError(f"conv1.weight has shape {stem.shape}: neither the 7x7 stem nor the "
                           "3x3 CIFAR stem of the project's ResNet")
    multiplier = width / 64
    widths = [t[f"layer{i + 1}.0.conv1.weight"].shape[0] for i in range(4)]
    if widths != [scaled_width(64 * 2**i, multiplier) for i in range(4)]:
        raise WeightsError(f"the file's ResNet stage widths {widths} are not the stem width "
                           f"{width} times 1, 2, 4, 8 (the project's width_multiplier)")
    return {"name": f"resnet{depth}", "width_multiplier": multiplier, "cifar_stem": kernel == 3}


def model_config(current: dict[str, Any], inferred: dict[str, Any]) -> dict[str, Any]:
    """``config.model`` for a file's architecture: the family's defaults, the config's own
    non-architecture fields when the family is the same (compute dtype, pooling, mask token,
    stochastic depth, init scheme), then ``inferred``."""
    family = "resnet" if inferred["name"].startswith("resnet") else "vit"
    same = str(current.get("name", "")).startswith("resnet") == (family == "resnet")
    arch = RESNET_ARCH_FIELDS if family == "resnet" else VIT_ARCH_FIELDS
    kept = {k: v for k, v in current.items() if same and k not in arch}
    model = {**MODEL_DEFAULTS[family], **kept, **inferred}
    if family == "vit" and current.get("pos_embed") == "sincos" and same \
            and inferred["pos_embed"] == "learned":
        model["pos_embed"] = "sincos"  # MAE: the file stores the fixed sin-cos table
    return model


# --- Fitting the tensors ------------------------------------------------------------------------


def _grid(tokens: int) -> int | None:
    side = math.isqrt(tokens)
    return side if side * side == tokens else None


def adapt(tensors: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], module: Any
          ) -> tuple[dict[str, np.ndarray], list[str]]:
    """The file's encoder tensors made to fit ``module`` where that is exact or standard:
    learned position embeddings resampled to its grid, a stored sin-cos table dropped for a
    ``pos_embed='sincos'`` ViT, a mask token dropped for a ViT without one."""
    tensors, notes = dict(tensors), []
    if not isinstance(module, ViT):
        return tensors, notes
    pos = tensors.get("pos_embed")
    prefix = module.num_prefix_tokens
    if pos is not None and "pos_embed" not in expected and module.pos_embed == "sincos":
        del tensors["pos_embed"]
        side = _grid(pos.shape[1] - prefix) or _grid(pos.shape[1])
        if side:
            table = sincos_2d_pos_embed(pos.shape[-1], (side, side))
            err = float(np.max(np.abs(pos[0, -side * side:] - table)))
            notes.append(f"the file's pos_embed was dropped (the config's ViT uses the fixed "
                         f"sin-cos table; largest difference from it {err:.2e})")
    elif pos is not None and "pos_embed" in expected and pos.shape != expected["pos_embed"]:
        want = expected["pos_embed"]
        old, new = _grid(pos.shape[1] - prefix), _grid(want[1] - prefix)
        if old and new and pos.shape[2] == want[2] and pos.ndim == 3:
            patches = resize_pos_embed(jnp.asarray(pos[:, prefix:], jnp.float32), (old, old),
                                       (new, new))
            tensors["pos_embed"] = np.concatenate([pos[:, :prefix], np.asarray(patches)], axis=1)
            notes.append(f"pos_embed resampled from a {old}x{old} to a {new}x{new} patch grid "
                         "(bicubic)")
    if "mask_token" in tensors and "mask_token" not in expected:
        del tensors["mask_token"]
        notes.append("the file's mask_token was dropped (the config's ViT has none)")
    return tensors, notes


def check_tensors(tensors: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]],
                  what: str, hint: str) -> list[str]:
    """Raises a WeightsError naming the first key (in the order the network runs,
    :func:`~ssl_jax.convert.keymap.forward_order`) whose shape differs between the file and
    ``expected``, or that one of them lacks. Keys of :data:`NEW_IF_MISSING` may be missing from
    the file (returned)."""
    problems = []
    for name in sorted(set(tensors) | set(expected), key=keymap.forward_order):
        got = tuple(np.shape(tensors[name])) if name in tensors else None
        want = expected.get(name)
        if got == want or (got is None and name.rsplit(".", 1)[-1] in NEW_IF_MISSING):
            continue
        if got is None:
            problems.append(f"{name}: the config's model has it with shape {list(want)}, the file"
                            " lacks it")
        elif want is None:
            problems.append(f"{name}: the file has it with shape {list(got)}, the config's model"
                            " lacks it")
        else:
            problems.append(f"{name}: shape {list(got)} in the file, {list(want)} in the "
                            "config's model")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        held = _described(tensors)
        raise WeightsError(f"the weights do not fit {what}: {problems[0]}{more}{held}"
                           + (f". {hint}" if hint else ""))
    return [k for k in expected if k not in tensors]


def _described(tensors: dict[str, np.ndarray]) -> str:
    """'. The file holds model {...}' (its heads when they can be told), or '' for a file whose
    encoder is none this module reads."""
    for heads in (0, 1):
        try:
            model = infer_model(tensors, num_heads=heads)
        except WeightsError:
            continue
        if heads:
            model.pop("num_heads")
        return f". The file holds model {model}"
    return ""


def load_encoder(tensors: dict[str, np.ndarray], initial: Any, module: Any, what: str,
                 hint: str) -> tuple[Any, list[str]]:
    """``(variables, notes)``: the encoder's variables (numpy, the layout of ``initial``, its
    initialised variables) from the file's tensors, after :func:`adapt` and
    :func:`check_tensors`; a parameter of :data:`NEW_IF_MISSING` the file lacks keeps its
    initial value."""
    table = renames(module)
    expected = keymap.expected_shapes(initial, table)
    tensors, notes = adapt(tensors, expected, module)
    missing = check_tensors(tensors, expected, what, hint)
    if missing:
        initial_tensors = keymap.to_torch(initial, table)
        tensors = {**tensors, **{k: initial_tensors[k] for k in missing}}
        notes.append(f"{', '.join(missing)}: not in the file, initialised as new")
    return keymap.from_torch(tensors, initial, table), notes

"""Parameter names and layouts: the project's Flax trees <-> PyTorch (timm / torchvision) names.

One table per network maps a Flax module path to the PyTorch module name; the leaf name and the
array's rank give the PyTorch parameter name and the layout change:

| Flax leaf | PyTorch | layout |
|---|---|---|
| Dense ``kernel [in, out]`` | ``weight [out, in]`` | transposed |
| Conv ``kernel [kh, kw, in, out]`` | ``weight [out, in, kh, kw]`` | ``(3, 2, 0, 1)`` |
| LayerNorm / BatchNorm ``scale``, ``bias`` | ``weight``, ``bias`` | same |
| BatchNorm ``batch_stats/mean``, ``var`` | ``running_mean``, ``running_var`` | same |
| LayerScale ``gamma`` | ``gamma`` | same |
| weight norm ``kernel_v``, ``gain [out]`` | ``weight_v``, ``weight_g [out, 1]`` | ``.T``, column |
| ``pos_embedding``, ``rel_pos/table`` | ``pos_embed``, ``relative_position_bias_table`` | same |

Modules are renamed by the tables below (``blocks_3`` -> ``blocks.3``, ``patch_embed`` ->
``patch_embed.proj``, ``rel_pos`` -> ``rel_pos_bias``, ``stage2_block1`` -> ``layer2.0``, ...).

The ViT table gives timm's ``VisionTransformer`` names (also those of DINO's, MAE's and BEiT's
code, up to the renames of :mod:`ssl_jax.convert.formats`); the ResNet table gives torchvision's
(which timm's ResNets share). Both directions use the same table, so a round trip is exact.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

# (pattern over one Flax module name, PyTorch replacement); the first that matches is used.
Renames = tuple[tuple[str, str], ...]

VIT_RENAMES: Renames = (
    (r"blocks_(\d+)", r"blocks.\1"),
    (r"patch_embed", "patch_embed.proj"),
    (r"rel_pos", "rel_pos_bias"),
)
RESNET_RENAMES: Renames = (
    (r"stem_conv", "conv1"),
    (r"stem_bn", "bn1"),
    (r"stage(\d+)_block(\d+)", lambda m: f"layer{m.group(1)}.{int(m.group(2)) - 1}"),
    (r"proj_conv", "downsample.0"),
    (r"proj_bn", "downsample.1"),
)
MAE_DECODER_RENAMES: Renames = (
    (r"embed", "decoder_embed"),
    (r"block(\d+)", r"decoder_blocks.\1"),
    (r"norm", "decoder_norm"),
    (r"pred", "decoder_pred"),
)


def dino_head_renames(num_layers: int, use_bn: bool) -> Renames:
    """DINO's head: ``mlp`` is one Linear for one layer, else ``Sequential(Linear, [BN], GELU,
    ..., Linear)``, whose Linear layers sit at indices ``i * step`` (step 2, 3 with BN)."""
    if num_layers == 1:
        return ((r"dense0", "mlp"),)
    step = 3 if use_bn else 2
    return ((r"dense(\d+)", lambda m: f"mlp.{int(m.group(1)) * step}"),
            (r"bn(\d+)", lambda m: f"mlp.{int(m.group(1)) * step + 1}"))


LEAF_NAMES = {"scale": "weight", "kernel": "weight", "mean": "running_mean",
              "var": "running_var", "pos_embedding": "pos_embed",
              "table": "relative_position_bias_table", "kernel_v": "weight_v", "gain": "weight_g"}


# Ranks of module names in the order the networks run (for naming the first of several
# mismatching tensors): the stem before the blocks, the blocks in order, the final norm last.
_FORWARD_RANK = {name: i for i, name in enumerate((
    "patch_embed", "conv1", "bn1", "cls_token", "mask_token", "pos_embed", "rel_pos_bias",
    "blocks", "layer1", "layer2", "layer3", "layer4", "norm1", "attn", "qkv", "proj", "ls1",
    "norm2", "mlp", "fc1", "fc2", "ls2", "conv2", "bn2", "conv3", "bn3", "downsample", "norm",
    "weight", "bias"))}


def forward_order(name: str) -> tuple:
    """A sort key putting PyTorch names in the order the network runs (numbers numerically)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, _FORWARD_RANK.get(p, len(_FORWARD_RANK)),
                                                      p) for p in name.split("."))


class Entry(NamedTuple):
    """One array: its Flax path (collection first), its PyTorch name and the layout change."""

    path: tuple[str, ...]
    name: str
    layout: str  # 'same' | 'dense' | 'conv' | 'column'


def _rename(module: str, renames: Renames) -> str:
    for pattern, repl in renames:
        match = re.fullmatch(pattern, module)
        if match:
            return repl(match) if callable(repl) else match.expand(repl)
    return module


def entry(path: tuple[str, ...], ndim: int, renames: Renames, prefix: str = "") -> Entry:
    """The :class:`Entry` of the Flax leaf at ``path`` (``('params', 'blocks_0', 'attn', 'qkv',
    'kernel')``) of rank ``ndim``."""
    *modules, leaf = path[1:]  # the collection ('params', 'batch_stats') is not in the name
    names = [_rename(m, renames) for m in modules] + [LEAF_NAMES.get(leaf, leaf)]
    layout = "same"
    if leaf in ("kernel", "kernel_v"):
        layout = {2: "dense", 4: "conv"}.get(ndim, "same")
    elif leaf == "gain":
        layout = "column"
    return Entry(tuple(path), prefix + ".".join(names), layout)


def entries(tree: Any, renames: Renames, prefix: str = "") -> list[Entry]:
    """The entries of every leaf of a Flax variables tree (arrays or shape structs), in the
    tree's order."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        out.append(entry(keys, np.ndim(leaf) if not hasattr(leaf, "shape") else len(leaf.shape),
                         renames, prefix))
    return out


_TO_TORCH: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "same": lambda a: a,
    "dense": lambda a: a.T,
    "conv": lambda a: a.transpose(3, 2, 0, 1),
    "column": lambda a: a[:, None],
}
_FROM_TORCH: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "same": lambda a: a,
    "dense": lambda a: a.T,
    "conv": lambda a: a.transpose(2, 3, 1, 0),
    "column": lambda a: a[:, 0],
}


def torch_shape(e: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a Flax leaf of ``shape``."""
    return tuple(_TO_TORCH[e.layout](np.empty(shape, np.bool_)).shape)


def to_torch(tree: Any, renames: Renames, prefix: str = "") -> dict[str, np.ndarray]:
    """``{PyTorch name: array}`` of a Flax variables tree, float32 arrays in PyTorch's layout."""
    leaves = {tuple(str(getattr(k, "key", k)) for k in p): leaf
              for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    return {e.name: np.asarray(_TO_TORCH[e.layout](np.asarray(leaves[e.path])), order="C")
            for e in entries(tree, renames, prefix)}


def from_torch(tensors: dict[str, np.ndarray], like: Any, renames: Renames, prefix: str = ""
               ) -> Any:
    """The Flax tree shaped as ``like`` (arrays or shape structs) filled from ``tensors``
    (PyTorch names and layouts), in each leaf's dtype. Every leaf's name must be present with
    the right shape (see :func:`ssl_jax.convert.fit.check_tensors`, which names a mismatch)."""
    by_path = {e.path: e for e in entries(like, renames, prefix)}

    def fill(path, leaf):
        e = by_path[tuple(str(getattr(k, "key", k)) for k in path)]
        value = _FROM_TORCH[e.layout](np.asarray(tensors[e.name]))
        if tuple(value.shape) != tuple(leaf.shape):
            raise ValueError(f"{e.name}: shape {value.shape} for a leaf of {leaf.shape}")
        return np.asarray(value.astype(leaf.dtype), order="C")

    return jax.tree_util.tree_map_with_path(fill, like)


def expected_shapes(like: Any, renames: Renames, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """``{PyTorch name: PyTorch shape}`` of a Flax tree, in the tree's order."""
    leaves = {tuple(str(getattr(k, "key", k)) for k in p): leaf
              for p, leaf in jax.tree_util.tree_leaves_with_path(like)}
    return {e.name: torch_shape(e, tuple(leaves[e.path].shape))
            for e in entries(like, renames, prefix)}

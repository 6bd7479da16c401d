"""The checkpoints users have, brought to one form: timm's / torchvision's names for the encoder,
and the heads a file also holds, by part.

Handled (local files only):

- timm and torchvision ``state_dict`` files (``.safetensors`` or ``.pth``): ViTs, BEiTs, ResNets;
  a classifier (``head.*``, ``fc.*``) is dropped.
- DINO (``facebookresearch/dino``): the released ``dino_vits16_pretrain.pth`` (a plain
  backbone), and full training checkpoints ``{'student', 'teacher', 'dino_loss', ...}`` whose
  networks carry ``module.`` (DDP) and ``backbone.`` / ``head.`` (multi-crop wrapper) prefixes.
  The encoder is the teacher's backbone (the network DINO evaluates); the student's backbone,
  both heads and the loss's centre are the parts ``student_encoder``, ``head``,
  ``teacher_head``, ``center``.
- MAE (``facebookresearch/mae``): ``{'model': ...}``; ``decoder_*`` and ``mask_token`` are the
  decoder (part ``decoder``); a fine-tuned checkpoint's ``fc_norm`` is refused (its features
  are the LayerNorm of the mean token, which the project's ViT does not compute).
- BEiT (``microsoft/unilm``, and timm's ``beit_*``): ``{'model': ...}``; ``gamma_1/2`` become
  LayerScale ``ls1/ls2.gamma``, ``q_bias`` and ``v_bias`` one ``qkv.bias`` (the key bias is
  zero), the shared ``rel_pos_bias.relative_position_bias_table`` stays, per-block tables are
  accepted when they are all equal (one shared table), ``relative_position_index`` buffers are
  checked against the project's index and dropped; ``lm_head`` is the part ``lm_head``.
- Any ViT with q, k, v as three layers (``attn.q``, ``attn.k``, ``attn.v`` or ``q_proj`` ...):
  fused into ``attn.qkv`` (q, k, v stacked on the output axis, as timm's).
- timm's ``no_embed_class`` position embeddings (no row for the cls token): a zero row is put
  first, which adds nothing to the cls token.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import numpy as np

from ssl_jax.convert.files import WeightsError
from ssl_jax.models.vit_position import relative_position_index

WRAPPER_KEYS = ("teacher", "model", "state_dict", "model_ema", "module", "network")
WHOLE_FILE_PREFIXES = ("encoder.", "model.")  # a wrapper module around the whole network
CLASSIFIER_KEYS = re.compile(r"(head|fc|classifier)\.(weight|bias)")
_SPLIT_QKV = re.compile(r"(blocks\.\d+\.attn)\.(q|k|v)(?:_proj)?\.(weight|bias)")


class Parts(NamedTuple):
    """A file's tensors by part: ``encoder`` (timm / torchvision names) and ``heads``
    (``{part: {name: array}}``: ``head``, ``teacher_head``, ``student_encoder``, ``decoder``,
    ``lm_head``, ``center``), with ``notes`` on what was renamed or dropped."""

    encoder: dict[str, np.ndarray]
    heads: dict[str, dict[str, np.ndarray]]
    notes: list[str]


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or (hasattr(value, "shape") and hasattr(value, "dtype"))


def _state_dict(obj: Any) -> dict[str, np.ndarray] | None:
    """``obj`` as ``{name: array}`` if it is one (non-array values dropped), else None."""
    if not isinstance(obj, dict) or not obj:
        return None
    arrays = {k: v for k, v in obj.items() if isinstance(k, str) and _is_array(v)}
    return arrays if len(arrays) * 2 >= len(obj) else None


def parts_of(obj: Any, path: str, checkpoint_key: str = "") -> Parts:
    """The :class:`Parts` of a file's content (``read_weights``); ``checkpoint_key`` picks the
    entry of a training checkpoint to read (default: ``teacher``, then ``model``,
    ``state_dict``, ...)."""
    notes: list[str] = []
    heads: dict[str, dict[str, np.ndarray]] = {}
    if checkpoint_key:
        if not isinstance(obj, dict) or checkpoint_key not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise WeightsError(f"{path} has no entry {checkpoint_key!r} (--checkpoint_key); its "
                               f"top-level keys are {keys}")
        chosen = _state_dict(obj[checkpoint_key])
        if chosen is None:
            raise WeightsError(f"{path}[{checkpoint_key!r}] holds no tensors")
        notes.append(f"read the entry {checkpoint_key!r} of the checkpoint")
    elif (chosen := _state_dict(obj)) is None:
        found = next((k for k in WRAPPER_KEYS if isinstance(obj, dict)
                      and _state_dict(obj.get(k)) is not None), None)
        if found is None:
            keys = sorted(obj)[:20] if isinstance(obj, dict) else type(obj).__name__
            raise WeightsError(f"{path} holds no state_dict of tensors this reader recognises "
                               f"(top-level keys {keys}); name the entry that holds the weights "
                               "with --checkpoint_key")
        chosen = _state_dict(obj[found])
        notes.append(f"read the entry {found!r} of the checkpoint")
        if found == "teacher" and _state_dict(obj.get("student")) is not None:
            student = _strip_module(_state_dict(obj["student"]))
            backbone, head = _split_backbone(student)
            heads["student_encoder"], heads["head"] = backbone, head
            loss = obj.get("dino_loss")
            if isinstance(loss, dict) and _is_array(loss.get("center")):
                heads["center"] = {"center": np.asarray(loss["center"]).reshape(-1)}
    tensors = _strip_module(chosen)
    tensors, head = _split_backbone(tensors)
    if head:
        heads["teacher_head" if "head" in heads else "head"] = head
    return Parts(*_encoder_and_heads(tensors, heads, notes))


def _strip_module(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Without DDP's ``module.`` prefixes."""
    return {re.sub(r"^(module\.)+", "", k): v for k, v in tensors.items()}


def _split_backbone(tensors: dict[str, np.ndarray]
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """DINO's multi-crop wrapper: ``backbone.*`` (the encoder) and ``head.*`` (its head), each
    without the prefix; a file without ``backbone.`` keys is all encoder."""
    if not any(k.startswith("backbone.") for k in tensors):
        for prefix in WHOLE_FILE_PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix):]: v for k, v in tensors.items()}
        return tensors, {}
    backbone = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    return backbone, head


def _encoder_and_heads(tensors: dict[str, np.ndarray], heads: dict[str, Any], notes: list[str]
                       ) -> tuple[dict[str, np.ndarray], dict[str, Any], list[str]]:
    encoder: dict[str, np.ndarray] = {}
    decoder = {k: v for k, v in tensors.items() if k.startswith("decoder_")}
    if decoder:  # MAE: the mask token is the decoder's
        if "mask_token" in tensors:
            decoder["mask_token"] = tensors["mask_token"]
        heads["decoder"] = decoder
    lm_head = {k[len("lm_head."):]: v for k, v in tensors.items() if k.startswith("lm_head.")}
    if lm_head:
        heads["lm_head"] = lm_head
    dropped = []
    for name, value in tensors.items():
        if name in decoder or name.startswith(("decoder_", "lm_head.")):
            continue
        if CLASSIFIER_KEYS.fullmatch(name) or name.startswith("head.fc."):
            dropped.append(name)
            continue
        if name.endswith("num_batches_tracked"):
            continue
        encoder[name] = np.asarray(value)
    if dropped:
        notes.append(f"dropped the classifier {', '.join(sorted(dropped))}")
    if "fc_norm.weight" in encoder and "norm.weight" not in encoder:
        raise WeightsError(
            "the file's ViT ends in fc_norm (a LayerNorm after average pooling: a fine-tuned "
            "checkpoint), which the project's ViT does not compute; import the pre-training "
            "checkpoint (final norm before pooling) instead")
    encoder = _beit_names(encoder, notes)
    encoder = _fuse_qkv(encoder, notes)
    encoder = _pos_embed_with_cls_row(encoder, notes)
    return encoder, heads, notes


def _beit_names(tensors: dict[str, np.ndarray], notes: list[str]) -> dict[str, np.ndarray]:
    """BEiT's names and parameters as timm's ViT has them (see the module docstring)."""
    out: dict[str, np.ndarray] = {}
    tables = {}
    for name, value in tensors.items():
        if name.endswith("relative_position_index"):
            _check_rel_index(name, value, tensors)
            continue
        block_table = re.fullmatch(r"blocks\.(\d+)\.attn\.relative_position_bias_table", name)
        if block_table:
            tables[int(block_table.group(1))] = value
            continue
        name = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", name)
        q_bias = re.fullmatch(r"(blocks\.\d+\.attn)\.q_bias", name)
        if q_bias:
            v = tensors[f"{q_bias.group(1)}.v_bias"]
            out[f"{q_bias.group(1)}.qkv.bias"] = np.concatenate([value, np.zeros_like(value), v])
            continue
        if name.endswith(".attn.v_bias"):
            continue
        out[name] = value
    if tables:
        first = tables[min(tables)]
        if any(not np.array_equal(t, first) for t in tables.values()):
            raise WeightsError(
                "the file's blocks have relative position bias tables of their own (a fine-tuned"
                " BEiT); the project's ViT has one table shared by all blocks (BEiT's "
                "pre-training setting): import the pre-training checkpoint instead")
        out["rel_pos_bias.relative_position_bias_table"] = first
        notes.append("the blocks' equal relative position bias tables became one shared table")
    if any(k.endswith("q_bias") for k in tensors):
        notes.append("q_bias and v_bias became qkv.bias with a zero key bias (BEiT's)")
    return out


def _check_rel_index(name: str, index: np.ndarray, tensors: dict[str, np.ndarray]) -> None:
    """A stored relative position index must be the project's for the same grid."""
    tokens = index.shape[0]
    side = math.isqrt(tokens - 1)
    if side * side != tokens - 1:
        raise WeightsError(f"{name} has shape {index.shape}, not that of a square patch grid "
                           "with a cls token")
    if not np.array_equal(np.asarray(index), relative_position_index((side, side), 1)):
        raise WeightsError(f"{name} differs from BEiT's relative position index of a "
                           f"{side}x{side} grid, which the project's ViT uses; the table "
                           "would be read wrongly")


def _fuse_qkv(tensors: dict[str, np.ndarray], notes: list[str]) -> dict[str, np.ndarray]:
    """Separate q, k, v projections -> timm's fused ``qkv`` (stacked on the output axis)."""
    split: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    out = {}
    for name, value in tensors.items():
        match = _SPLIT_QKV.fullmatch(name)
        if match:
            split.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = value
        else:
            out[name] = value
    for (block, kind), qkv in split.items():
        if set(qkv) != {"q", "k", "v"}:
            raise WeightsError(f"{block} has {sorted(qkv)} {kind}s but not all of q, k, v")
        out[f"{block}.qkv.{kind}"] = np.concatenate([qkv["q"], qkv["k"], qkv["v"]], axis=0)
    if split:
        notes.append("fused separate q, k, v projections into qkv")
    return out


def _pos_embed_with_cls_row(tensors: dict[str, np.ndarray], notes: list[str]
                            ) -> dict[str, np.ndarray]:
    pos = tensors.get("pos_embed")
    if pos is None or "cls_token" not in tensors or pos.ndim != 3:
        return tensors
    n = pos.shape[1]
    if math.isqrt(n) ** 2 == n and math.isqrt(n - 1) ** 2 != n - 1:
        notes.append("pos_embed had no row for the cls token (no_embed_class): a zero row added")
        return {**tensors, "pos_embed": np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)}
    return tensors

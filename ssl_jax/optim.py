"""Optimizers and learning-rate schedules, all from optax.

``config.optim`` holds::

    name            'lars' | 'adamw' | 'sgd'
    base_lr         the paper's base learning rate, scaled to the global batch B by ``lr_scaling``
    lr_scaling      'linear' (lr = base_lr * B / 256, Goyal et al.; DINO, MAE, BEiT, SimCLR's
                    default), 'sqrt' (base_lr * sqrt(B), SimCLR's square-root rule, whose base
                    is 0.075 for LARS at any batch) or 'none' (lr = base_lr)
    warmup_epochs   linear warm-up from 0, then cosine decay to ``end_lr_factor * lr``
    end_lr_factor
    weight_decay    decoupled weight decay (LARS: added to the gradient before the trust ratio)
    momentum        LARS / SGD momentum
    b1, b2          AdamW betas
    grad_clip_norm  gradient clipping (0 disables)
    grad_clip_kind  'global' (one norm over all gradients) or 'per_parameter' (each parameter's
                    gradient clipped to its own norm, as DINO's code does)
    weight_decay_end  > 0: weight decay follows a cosine from ``weight_decay`` at step 0 to
                    ``weight_decay_end`` at the last step (DINO: 0.04 -> 0.4); 0: constant
    decay_all       True: weight decay on every parameter, biases and norm parameters too, as
                    torch optimizers over ``model.parameters()`` do (the official MoCo code,
                    lightly); False (default): only on kernels (below). LARS's trust ratio
                    skips biases and norms either way
    freeze          ``((regex, epochs), ...)``: parameters whose ``/``-joined path matches
                    ``regex`` get no update at all (no gradient step, no weight decay, no moment
                    update) during the first ``epochs`` epochs, e.g. DINO's last layer

Fine-tuning adds ``layer_decay`` (layer-wise learning-rate decay, BEiT / MAE): the update of a
parameter in layer ``l`` of ``L`` is scaled by ``layer_decay ** (L - l)``
(:func:`scale_by_layer_decay`, layer ids from :func:`vit_layer_id` / :func:`resnet_layer_id`).

Weight decay (unless ``decay_all``) and LARS's trust-ratio adaptation skip biases and
normalisation parameters (every parameter with fewer than 2 dimensions), and ViT tokens and
position embeddings, as SimCLR, BYOL and MAE do. Keys added after a run
started are read with their defaults, so older runs' configs still restore.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ssl_jax.config import require


def peak_learning_rate(cfg: ml_collections.ConfigDict, global_batch_size: int) -> float:
    """``base_lr`` scaled to the global batch as the papers write it: linear, base * B / 256
    (Goyal et al. 2017), or SimCLR's square root, base * sqrt(B) (not of B / 256: SimCLR's
    ``0.075 * sqrt(B)`` is typed as ``base_lr=0.075``)."""
    batch = float(global_batch_size)
    scale = {"linear": batch / 256, "sqrt": math.sqrt(batch), "none": 1.0}.get(cfg.lr_scaling)
    require(scale is not None, "optim.lr_scaling", "must be 'linear', 'sqrt' or 'none'")
    return cfg.base_lr * scale


def learning_rate_schedule(
    cfg: ml_collections.ConfigDict, global_batch_size: int, total_steps: int, steps_per_epoch: int
) -> optax.Schedule:
    """Linear warm-up over ``warmup_epochs`` then cosine decay to ``end_lr_factor`` x peak."""
    peak = peak_learning_rate(cfg, global_batch_size)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=peak * cfg.end_lr_factor,
    )


# Learned tokens and position embeddings (absolute, or BEiT's relative bias table ``rel_pos``)
# get no weight decay (timm's / MAE's / BEiT's no_weight_decay).
_NO_DECAY_NAMES = re.compile(r"(?:^|/)(?:cls_token|mask_token|pos_embedding|rel_pos)(?:/|$)")


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay (kernels), False for biases, norm scales, the
    cls and mask tokens and learned position embeddings (absolute or relative)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim > 1 and not _NO_DECAY_NAMES.search(
            jax.tree_util.keystr(path, simple=True, separator="/")),
        params)


def weight_decay_schedule(
    cfg: ml_collections.ConfigDict, total_steps: int
) -> float | optax.Schedule:
    """``weight_decay`` as is, or with ``weight_decay_end`` > 0 DINO's cosine::

        wd(t) = end + (start - end) * (1 + cos(pi * t / T)) / 2,   T = total_steps

    (``start`` at step 0, ``end`` from step T on)."""
    start, end = cfg.weight_decay, cfg.weight_decay_end
    require(end >= 0, "optim.weight_decay_end", "must be >= 0 (0 keeps weight decay constant)")
    if not end:
        return start
    horizon = max(total_steps, 1)

    def schedule(count):
        t = jnp.minimum(count, horizon) / horizon
        return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))

    return schedule


def clip_by_parameter_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales each parameter's gradient ``g`` by ``min(1, max_norm / (||g|| + 1e-6))`` (DINO's
    ``clip_gradients``), unlike ``optax.clip_by_global_norm`` which uses one norm for all."""

    def clip(updates, params=None):
        del params

        def one(g):
            norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
            return g * jnp.minimum(1.0, max_norm / (norm + 1e-6)).astype(g.dtype)

        return jax.tree_util.tree_map(one, updates)

    return optax.stateless(clip)


def _decay_everything(params: Any) -> Any:
    return jax.tree_util.tree_map(lambda _: True, params)


def _base_optimizer(
    cfg: ml_collections.ConfigDict, learning_rate: optax.Schedule, weight_decay: Any
) -> optax.GradientTransformation:
    decay_all = cfg.get("decay_all", False)  # absent from fine-tuning configs saved before it
    require(isinstance(decay_all, bool), "optim.decay_all", "must be True or False")
    mask = _decay_everything if decay_all else decay_mask
    if cfg.name == "lars":
        return optax.lars(
            learning_rate,
            weight_decay=weight_decay,
            weight_decay_mask=mask,
            trust_ratio_mask=decay_mask,
            momentum=cfg.momentum,
        )
    if cfg.name == "adamw":
        return optax.adamw(
            learning_rate, b1=cfg.b1, b2=cfg.b2, weight_decay=weight_decay, mask=mask
        )
    if cfg.name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay, mask=mask),
            optax.sgd(learning_rate, momentum=cfg.momentum),
        )
    raise ValueError(f"config.optim.name={cfg.name!r} must be 'lars', 'adamw' or 'sgd'")


def _shifted(schedule: Any, shift: int) -> Any:
    """``schedule(count + shift)``: a frozen group's optimizer counts only its own updates."""
    if not callable(schedule) or not shift:
        return schedule
    return lambda count: schedule(count + shift)


def freeze_labels(params: Any, rules: tuple[tuple[str, float], ...]) -> Any:
    """Per parameter: ``'freeze{i}'`` for the first rule whose regex matches its path, else
    ``'train'``."""
    compiled = [re.compile(pattern) for pattern, _ in rules]

    def label(path, _):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        for i, pattern in enumerate(compiled):
            if pattern.search(name):
                return f"freeze{i}"
        return "train"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
    cfg: ml_collections.ConfigDict,
    schedule: optax.Schedule,
    steps_per_epoch: int = 1,
    total_steps: int = 1,
) -> optax.GradientTransformation:
    """The optimizer named by ``cfg.name`` driven by ``schedule``, with optional clipping, a
    weight-decay schedule and parameter groups frozen for the first epochs.

    The state's structure depends on the config only, not on the run length, so a job that only
    restores a checkpoint may pass the defaults."""
    require(cfg.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    require(cfg.base_lr > 0, "optim.base_lr", "must be > 0")
    clip_kind = cfg.grad_clip_kind
    require(clip_kind in ("global", "per_parameter"), "optim.grad_clip_kind",
            "must be 'global' or 'per_parameter'")
    rules = tuple(cfg.freeze)
    for rule in rules:
        require(isinstance(rule, (tuple, list)) and len(rule) == 2 and rule[1] >= 0,
                "optim.freeze", f"entry {rule!r} must be a pair (regex, epochs >= 0)")
        try:
            re.compile(rule[0])
        except (re.error, TypeError) as e:
            require(False, "optim.freeze", f"regex {rule[0]!r} does not compile: {e}")
    weight_decay = weight_decay_schedule(cfg, total_steps)
    tx = _base_optimizer(cfg, schedule, weight_decay)
    if rules:
        groups: dict[str, optax.GradientTransformation] = {"train": tx}
        for i, (_, epochs) in enumerate(rules):
            steps = int(round(epochs * steps_per_epoch))
            inner = _base_optimizer(cfg, _shifted(schedule, steps), _shifted(weight_decay, steps))
            groups[f"freeze{i}"] = optax.transforms.conditionally_mask(
                inner, _from_step(steps))
        tx = optax.multi_transform(groups, lambda params: freeze_labels(params, rules))
    if cfg.grad_clip_norm:
        clip = (optax.clip_by_global_norm if clip_kind == "global" else clip_by_parameter_norm)
        tx = optax.chain(clip(cfg.grad_clip_norm), tx)
    return tx


def _from_step(steps: int) -> Callable[[jax.Array], jax.Array]:
    return lambda count: count >= steps


# --- Layer-wise learning-rate decay (BEiT, Bao et al. 2022; MAE fine-tuning, He et al. 2022) ---

_VIT_BLOCK = re.compile(r"(?:^|/)blocks_(\d+)(?:/|$)")
_VIT_EMBEDDING = re.compile(r"(?:^|/)(?:patch_embed|cls_token|pos_embedding|mask_token)(?:/|$)")
_RESNET_STAGE = re.compile(r"(?:^|/)stage(\d+)_block\d+(?:/|$)")
_RESNET_STEM = re.compile(r"(?:^|/)stem_\w+(?:/|$)")


def vit_layer_id(name: str, depth: int) -> int:
    """Layer of a ViT parameter from its ``/``-joined path: the embeddings (``patch_embed``,
    ``cls_token``, ``pos_embedding``, ``mask_token``) are layer 0, block ``blocks_i`` is layer
    ``i + 1``, everything after the blocks (final norm, pooling norm, classifier) ``depth + 1``
    (BEiT's ``get_layer_id_for_vit``, MAE's ``param_groups_lrd``)."""
    block = _VIT_BLOCK.search(name)
    if block:
        return int(block.group(1)) + 1
    if _VIT_EMBEDDING.search(name):
        return 0
    return depth + 1


def resnet_layer_id(name: str, num_stages: int) -> int:
    """Layer of a ResNet parameter from its path: the stem 0, stage ``s`` (``stage{s}_block*``,
    1-based) ``s``, everything after the stages (classifier) ``num_stages + 1``."""
    stage = _RESNET_STAGE.search(name)
    if stage:
        return int(stage.group(1))
    if _RESNET_STEM.search(name):
        return 0
    return num_stages + 1


def layer_decay_scales(
    tree: Any, decay: float, layer_id: Callable[[str], int], num_layers: int
) -> Any:
    """Per leaf of ``tree``: ``decay ** (num_layers - layer_id(path))``, a Python float.

    With ``num_layers = depth + 1`` for a ViT the classifier gets 1 and the patch embedding
    ``decay ** (depth + 1)``."""
    require(0.0 < decay <= 1.0, "optim.layer_decay", f"must lie in (0, 1], got {decay!r}")

    def scale(path, _):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        layer = layer_id(name)
        if not 0 <= layer <= num_layers:
            raise ValueError(f"layer id {layer} of parameter {name!r} is outside [0, {num_layers}]")
        return float(decay ** (num_layers - layer))

    return jax.tree_util.tree_map_with_path(scale, tree)


def scale_by_layer_decay(
    decay: float, layer_id: Callable[[str], int], num_layers: int
) -> optax.GradientTransformation:
    """Multiplies each parameter's update by :func:`layer_decay_scales`; chained after an
    optimizer whose update is proportional to the learning rate (AdamW, SGD, LARS: weight decay
    included), it is the per-layer learning rate ``lr * decay ** (num_layers - layer)``."""
    require(0.0 < decay <= 1.0, "optim.layer_decay", f"must lie in (0, 1], got {decay!r}")

    def scale(updates, params=None):
        del params
        scales = layer_decay_scales(updates, decay, layer_id, num_layers)
        return jax.tree_util.tree_map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales)

    return optax.stateless(scale)


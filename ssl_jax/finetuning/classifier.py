"""The fine-tuning model: a pre-trained (or fresh) encoder with a pooled linear classifier, and
its parameters' layers for layer-wise learning-rate decay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from ssl_jax import optim
from ssl_jax.models.resnet import ResNet
from ssl_jax.models.vit import LN_EPSILON, ViT

POOLS = ("gap", "cls")
# MAE's head initialisation: trunc_normal_(head.weight, std=2e-5), zero bias.
HEAD_INIT_STD = 2e-5


class Classifier(nn.Module):
    """``encoder`` -> pooled features -> ``head`` (Dense): ``[batch, h, w, 3] -> [batch, C]``.

    Pooling of a ViT: ``'gap'`` averages the patch tokens *before* the encoder's final norm
    and normalises the mean with a LayerNorm ``fc_norm`` instead, as MAE's and BEiT's
    fine-tuning do (``global_pool``/``use_mean_pooling``: ``del self.norm``; the encoder then
    has no ``norm`` parameters, see :func:`without_unused`); ``'cls'`` takes the cls token
    after the final norm. A ResNet is always globally average-pooled (``'gap'``).
    Parameters: ``{'encoder': ..., 'fc_norm': ... (ViT + gap), 'head': ...}``.
    """

    encoder: nn.Module
    num_classes: int
    pool: str = "gap"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        check_pool(self.encoder, self.pool)
        batch = x.shape[0]
        if isinstance(self.encoder, ViT) and self.pool == "gap":
            tokens = self.encoder(x, train, return_tokens=True, final_norm=False)
            feats = jnp.mean(tokens[:, self.encoder.num_prefix_tokens:], axis=1)
            feats = nn.LayerNorm(epsilon=LN_EPSILON, name="fc_norm")(feats)
        else:
            feats = self.encoder(x, train)
        logits = nn.Dense(
            self.num_classes, kernel_init=nn.initializers.truncated_normal(HEAD_INIT_STD),
            name="head")(feats.astype(jnp.float32))
        chex.assert_shape(logits, (batch, self.num_classes))
        return logits


def without_unused(encoder: nn.Module, pool: str, encoder_vars: dict[str, Any]
                   ) -> dict[str, Any]:
    """The pre-trained encoder variables the :class:`Classifier` uses: a ViT pooled by ``'gap'``
    has no final norm (MAE's and BEiT's ``del self.norm``), so its ``norm`` parameters are
    left out (the classifier's own init never creates them)."""
    if not (isinstance(encoder, ViT) and pool == "gap"):
        return encoder_vars
    params = {k: v for k, v in encoder_vars["params"].items() if k != "norm"}
    return {**encoder_vars, "params": params}


def check_pool(encoder: nn.Module, pool: str) -> None:
    """Raises ValueError unless ``pool`` suits ``encoder`` (see :class:`Classifier`)."""
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r} is unknown; use one of {POOLS}")
    if pool == "cls" and not (isinstance(encoder, ViT) and encoder.use_cls_token):
        raise ValueError(f"pool='cls' needs a ViT with a cls token, and this "
                         f"{type(encoder).__name__} encoder has none; use pool='gap'")


def layer_ids(encoder: nn.Module) -> tuple[Callable[[str], int], int]:
    """``(layer_id(path) -> int, num_layers)`` for layer-wise decay of a :class:`Classifier`'s
    parameters: a ViT has ``depth + 1`` layers above its embeddings, a ResNet one per stage
    plus the classifier."""
    if isinstance(encoder, ViT):
        depth = encoder.depth
        return (lambda name: optim.vit_layer_id(name, depth)), depth + 1
    if isinstance(encoder, ResNet):
        stages = len(encoder.stage_sizes)
        return (lambda name: optim.resnet_layer_id(name, stages)), stages + 1
    raise TypeError(f"no layer ids for a {type(encoder).__name__} encoder; layer-wise decay "
                    "knows ViT and ResNet")


def with_drop_path(encoder: nn.Module, rate: float) -> tuple[nn.Module, bool]:
    """``(encoder with stochastic depth rate, applied)``: ViTs take it, ResNets have none."""
    if isinstance(encoder, ViT):
        return encoder.clone(drop_path_rate=float(rate)), True
    return encoder, False


def encoder_image_size(encoder: nn.Module) -> Any:
    """The input side a ViT's position embeddings were built for; None for a ResNet."""
    return encoder.image_size if isinstance(encoder, ViT) else None

"""The papers' linear-probe protocols (``eval.protocol``), beside the default fast probe.

- ``'fast'`` (default): ``linear_probe.py`` on cached features of the last block, without
  augmentation, its learning rate and weight decay chosen on a held-out part of the train split.
- ``'dino'`` (DINO's ``eval_linear.py``): the features are the cls tokens of the last
  ``n_last_blocks`` blocks (4 for ViT-S), each through the final norm, concatenated, and with
  ``eval.avgpool_patchtokens`` the mean patch token of the last block too (their ViT-B
  setting: 1 block + avgpool); a linear layer (normal(0.01) weights, zero bias) trained with
  SGD (momentum 0.9, no weight decay), LR 0.001 x B/256 on a cosine to 0, batch 1024, 100
  epochs, on random resized crops (scale 0.08-1) and flips of the training images through the
  frozen encoder; top-1 on the centre crops of the test split.
- ``'mae'`` (MAE's ``main_linprobe.py``): the cls token after the final norm, through a
  BatchNorm without affine parameters (eps 1e-6, running statistics at test time) and a linear
  layer (trunc-normal(0.01)); LARS (momentum 0.9, no weight decay), LR 0.1 x B/256 with 10
  warm-up epochs then cosine, batch 16384, 90 epochs; the same augmentation.

A ResNet's pooled features stand for the tokens in both. ``eval.protocol_epochs``,
``eval.protocol_batch_size``, ``eval.protocol_base_lr`` and ``eval.n_last_blocks`` replace the
recipe's values when > 0 (a short run on small data, a smaller machine; the warm-up keeps its
share of the epochs). No validation split
and no grid: these protocols report the test top-1 of their fixed recipe, as the papers do.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ssl_jax import optim, parallel, presets
from ssl_jax.data import augment, pipeline
from ssl_jax.evaluate.features import extract_features
from ssl_jax.models.vit import ViT

PROTOCOLS = ("fast", "dino", "mae")
RECIPES: dict[str, dict[str, Any]] = {
    "dino": dict(optimizer="sgd", base_lr=1e-3, batch_size=1024, epochs=100, warmup_epochs=0.0,
                 batchnorm=False, n_last_blocks=4),
    "mae": dict(optimizer="lars", base_lr=0.1, batch_size=16384, epochs=90, warmup_epochs=10.0,
                batchnorm=True, n_last_blocks=1),
}
HEAD_INIT_STD = 0.01  # both papers
BN_EPS, BN_MOMENTUM = 1e-6, 0.1  # MAE's BatchNorm1d(affine=False, eps=1e-6), PyTorch momentum


def recipe(ev: ml_collections.ConfigDict) -> dict[str, Any]:
    """The protocol's recipe with the ``eval.protocol_*`` / ``n_last_blocks`` overrides."""
    out = dict(RECIPES[ev.protocol])
    for key, name in (("epochs", "protocol_epochs"), ("batch_size", "protocol_batch_size"),
                      ("base_lr", "protocol_base_lr"), ("n_last_blocks", "n_last_blocks")):
        if ev.get(name, 0) > 0:
            out[key] = ev[name]
    # Fewer epochs keep the warm-up's share of the run (MAE: 10 of 90).
    out["warmup_epochs"] *= out["epochs"] / RECIPES[ev.protocol]["epochs"]
    out["avgpool"] = bool(ev.get("avgpool_patchtokens", False))
    return out


def protocol_features(method: Any, variables: Any, images: jax.Array, n_last_blocks: int,
                      avgpool: bool) -> jax.Array:
    """``[batch, d']`` float32 features of normalised ``images`` for the protocols (module
    docstring): the last blocks' cls tokens (+ the mean patch token) of a ViT, else the
    encoder's pooled features."""
    encoder, x = method.encoder, method.encoder_input(images)
    if not isinstance(encoder, ViT):
        return encoder.apply(variables, x, train=False).astype(jnp.float32)
    if not 1 <= n_last_blocks <= encoder.depth:
        raise ValueError(f"eval.n_last_blocks={n_last_blocks} must lie in [1, {encoder.depth}] "
                         f"(the ViT's depth)")

    def last_blocks(vit: ViT, x: jax.Array) -> jax.Array:
        tokens, bias, _ = vit.input_tokens(x)
        outs = []
        for i, block in enumerate(vit.blocks):
            tokens = block(tokens, False, bias)
            if i >= vit.depth - n_last_blocks:
                outs.append(vit.norm(tokens).astype(jnp.float32))
        feats = [vit.pool(t) for t in outs]  # the cls token (the patch mean without one)
        if avgpool:
            feats.append(jnp.mean(outs[-1][:, vit.num_prefix_tokens:], axis=1))
        return jnp.concatenate(feats, axis=-1)

    return encoder.apply(variables, x, method=last_blocks)


def _normalise(feats: jax.Array, bn: dict[str, jax.Array] | None, train: bool):
    """MAE's BatchNorm1d(affine=False): batch statistics in training (running ones updated
    with the unbiased variance), running statistics at test time; identity without ``bn``."""
    if bn is None:
        return feats, bn
    if not train:
        return (feats - bn["mean"]) / jnp.sqrt(bn["var"] + BN_EPS), bn
    mean, var = jnp.mean(feats, axis=0), jnp.var(feats, axis=0)
    n = feats.shape[0]
    new = {"mean": (1 - BN_MOMENTUM) * bn["mean"] + BN_MOMENTUM * mean,
           "var": (1 - BN_MOMENTUM) * bn["var"] + BN_MOMENTUM * var * n / max(n - 1, 1)}
    return (feats - mean) / jnp.sqrt(var + BN_EPS), new


def train_protocol_probe(method: Any, variables: Any, config: ml_collections.ConfigDict,
                         mesh: Any) -> dict[str, Any]:
    """Trains the linear classifier of ``config.eval.protocol`` ('dino' or 'mae') on augmented
    views through the frozen encoder and returns its test top-1 with the recipe used."""
    ev, data = config.eval, config.data
    r = recipe(ev)
    num_train = pipeline.num_examples(data, data.train_split)
    batch = min(r["batch_size"], num_train - num_train % mesh.size)
    parallel.check_global_batch(batch, mesh)
    steps_per_epoch = max(num_train // batch, 1)
    total = r["epochs"] * steps_per_epoch
    ocfg = presets.optim_config(name=r["optimizer"], base_lr=r["base_lr"], lr_scaling="linear",
                                warmup_epochs=r["warmup_epochs"], weight_decay=0.0, momentum=0.9)
    schedule = optim.learning_rate_schedule(ocfg, batch, total, steps_per_epoch)
    tx = optim.make_optimizer(ocfg, schedule, steps_per_epoch, total)
    crop = config.aug.view1.size
    view = presets.view_config(size=crop, crop_scale=(0.08, 1.0), flip=True, color_jitter=0.0,
                               color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    num_classes = pipeline.num_classes(data)

    def features(images, hw, key):
        x = augment.normalize(augment.augment_view(key, images, view, hw))
        f = protocol_features(method, variables, x, r["n_last_blocks"], r["avgpool"])
        return jax.lax.stop_gradient(f)

    dim = jax.eval_shape(
        lambda x: protocol_features(method, variables, x, r["n_last_blocks"], r["avgpool"]),
        jnp.zeros((1, crop, crop, 3), jnp.float32)).shape[-1]
    key = jax.random.key(config.seed)
    head = {"kernel": HEAD_INIT_STD * jax.random.truncated_normal(key, -2.0, 2.0,
                                                                  (dim, num_classes)),
            "bias": jnp.zeros((num_classes,))}
    bn = {"mean": jnp.zeros((dim,)), "var": jnp.ones((dim,))} if r["batchnorm"] else None
    opt_state = tx.init(head)

    @jax.jit
    def step(head, opt_state, bn, images, hw, labels, key):
        feats, bn = _normalise(features(images, hw, key), bn, train=True)

        def loss_fn(head):
            logits = feats @ head["kernel"] + head["bias"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(head)
        updates, opt_state = tx.update(grads, opt_state, head)
        return optax.apply_updates(head, updates), opt_state, bn, loss

    loader = iter(pipeline.train_loader(data, global_batch_size=batch, seed=config.seed,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count()))
    loss = jnp.nan
    for t in range(total):
        arrays = parallel.global_batch(next(loader), mesh)
        head, opt_state, bn, loss = step(head, opt_state, bn, arrays["image"],
                                         arrays.get("image_hw"), arrays["label"],
                                         jax.random.fold_in(key, t + 1))

    test_x, test_y = extract_features(
        method.encoder, variables, config, data.test_split, mesh,
        embed_fn=lambda v, x: protocol_features(method, v, x, r["n_last_blocks"], r["avgpool"]))
    feats, _ = _normalise(jnp.asarray(test_x), bn, train=False)
    predicted = np.asarray(jnp.argmax(feats @ head["kernel"] + head["bias"], axis=-1))
    return {"protocol": ev.protocol, "top1": float(np.mean(predicted == test_y)),
            "steps": total, "batch_size": batch, "feature_dim": int(dim),
            "final_loss": float(loss), "peak_lr": optim.peak_learning_rate(ocfg, batch),
            "recipe": dict(r)}

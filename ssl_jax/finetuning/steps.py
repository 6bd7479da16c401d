"""Fine-tuning's train step and its test-set top-1. The encoder sees
``encoder_input(normalised images)`` (the method's :meth:`~ssl_jax.methods.base.MethodBase.
encoder_input`) in both, as in pre-training and feature extraction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ssl_jax import parallel
from ssl_jax.data import augment, pipeline
from ssl_jax.evaluate.features import eval_view
from ssl_jax.finetuning import mixup


def make_train_step(model, tx, schedule, base_rng, view, config, num_classes: int,
                    encoder_input: Callable[[jax.Array], jax.Array]):
    """``(state, batch) -> (state, metrics)``: augment, mix, one optimizer step on the global
    batch (BatchNorm statistics of the global batch, updated when the model has them).

    The state is ``{step, params, batch_stats, opt_state, nonfinite_steps}``. A step whose loss or
    gradient is not finite leaves it unchanged but for ``step`` and the count
    ``nonfinite_steps`` (as pre-training's :func:`ssl_jax.step.make_train_step`)."""
    mix = config.mixup.to_dict()
    smoothing = config.label_smoothing

    def train_step(state, batch):
        rng = jax.random.fold_in(base_rng, state["step"])
        k_aug, k_mix, k_drop = jax.random.split(rng, 3)
        x = augment.normalize(augment.augment_view(k_aug, batch["image"], view,
                                                   batch.get("image_hw")))
        x, targets = mixup.mix_batch(k_mix, x, batch["label"], num_classes, smoothing=smoothing,
                                     **mix)
        x = encoder_input(x)

        def loss_fn(params):
            variables = {"params": params}
            if state["batch_stats"]:
                variables["batch_stats"] = state["batch_stats"]
                logits, updated = model.apply(variables, x, train=True, rngs={"dropout": k_drop},
                                              mutable=["batch_stats"])
                stats = updated["batch_stats"]
            else:
                logits = model.apply(variables, x, train=True, rngs={"dropout": k_drop})
                stats = state["batch_stats"]
            loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
            return loss, stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = {"params": optax.apply_updates(state["params"], updates), "batch_stats": stats,
               "opt_state": opt_state}
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new,
                                     {k: state[k] for k in new})
        new["step"] = state["step"] + 1
        new["nonfinite_steps"] = state["nonfinite_steps"] + (~finite).astype(jnp.int32)
        return new, {"loss": loss, "lr": schedule(state["step"]), "grad_norm": grad_norm}

    return train_step


def evaluate_top1(model, state: dict[str, Any], config, crop: int, mesh,
                  encoder_input: Callable[[jax.Array], jax.Array]) -> tuple[float, int]:
    """Top-1 of the fine-tuned model on the test split (centre view) and the number of images."""

    @jax.jit
    def correct(params, stats, images, labels, mask):
        variables = {"params": params, **({"batch_stats": stats} if stats else {})}
        logits = model.apply(variables, encoder_input(eval_view(images, crop)), train=False)
        return jnp.sum((jnp.argmax(logits, axis=-1) == labels) & mask), jnp.sum(mask)

    hits, total = 0, 0
    for batch in pipeline.eval_batches(
        config.data, config.data.test_split, batch_size=config.eval_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
    ):
        arrays = parallel.global_batch(batch, mesh)
        c, n = correct(state["params"], state["batch_stats"], arrays["image"], arrays["label"],
                       arrays["mask"])
        hits, total = hits + int(c), total + int(n)
    return hits / max(total, 1), total

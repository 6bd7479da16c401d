"""The online linear probe (solo-learn's online classifier): a linear classifier trained during
pre-training on the frozen features of each training batch, so that ``metrics.jsonl`` shows the
representation's quality (and a collapse) while the run goes on.

Inside the jitted train step (:func:`ssl_jax.step.make_train_step`), after the method's own
update and apart from it: the encoder (``method.encoder`` with ``method.encoder_variables`` of
the step's parameters, behind ``stop_gradient``) embeds the batch's images in the evaluation's
view (``augment.eval_view``: no augmentation, BatchNorm in inference mode), and one SGD step
(momentum 0.9, no weight decay, the learning rate ``online_probe.base_lr`` on a cosine to 0 over
the run) trains ``logits = features @ W + b`` by cross-entropy on the batch's labels. Its loss
and top-1 on the batch, measured before its update as solo-learn's ``train_acc1``, are logged
as ``probe_loss`` and ``probe_top1``. The probe's parameters and optimizer state live in the
train state under ``probe`` (saved with every checkpoint); nothing of it reaches the method's
gradients. Records without a label (-1, an unlabelled split) are left out of its loss.

It costs one more forward pass of the encoder on the batch per step (see
docs/benchmarks/evaluation_tools.md for the measured cost), so it is off by default:
``--config.online_probe.enabled=true``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ssl_jax.config import require
from ssl_jax.data import augment, pipeline

CONFIG_KEYS = ("enabled", "base_lr", "num_classes")
MOMENTUM = 0.9


def check_config(config: ml_collections.ConfigDict) -> None:
    """``config.online_probe``: its keys and their ranges, a ConfigError naming a bad one. A
    config written before the block existed (a run's old ``config.json`` given to the trainer
    as it is) has no probe."""
    if "online_probe" not in config:
        return
    cfg = config.online_probe
    unknown = sorted(set(cfg.keys()) - set(CONFIG_KEYS))
    require(not unknown, f"online_probe.{unknown[0] if unknown else ''}",
            f"is not a key of the online probe; its keys are {', '.join(CONFIG_KEYS)}")
    require(isinstance(cfg.enabled, bool), "online_probe.enabled", "must be true or false")
    require(cfg.base_lr > 0, "online_probe.base_lr", "must be > 0")
    require(cfg.num_classes >= 0, "online_probe.num_classes",
            "must be >= 0 (0: the classes of the training data)")


class OnlineProbe:
    """The probe of a run: ``init`` its state, ``update`` it in the train step."""

    def __init__(self, config: ml_collections.ConfigDict, method: Any, total_steps: int):
        check_config(config)
        cfg = config.online_probe
        self.method = method
        self.crop = int(config.aug.view1.size)
        self.num_classes = int(cfg.num_classes or pipeline.num_classes(config.data))
        schedule = optax.cosine_decay_schedule(cfg.base_lr, max(int(total_steps), 1))
        self.tx = optax.sgd(schedule, momentum=MOMENTUM)

    def features(self, variables: Any, batch: dict[str, jax.Array]) -> jax.Array:
        """``[batch, d]`` float32 frozen features of the batch's images (evaluation's view)."""
        views = augment.eval_view(batch["image"], self.crop, batch.get("image_hw"))
        variables = jax.lax.stop_gradient(variables)
        out = self.method.encoder.apply(variables, self.method.encoder_input(views), train=False)
        return jax.lax.stop_gradient(out.astype(jnp.float32))

    def init(self, variables: Any, batch: dict[str, jax.Array]) -> dict[str, Any]:
        """``{'params': {'kernel' [d, classes], 'bias' [classes]} (zeros), 'opt_state'}``."""
        dim = jax.eval_shape(self.features, variables, batch).shape[-1]
        params = {"kernel": jnp.zeros((dim, self.num_classes), jnp.float32),
                  "bias": jnp.zeros((self.num_classes,), jnp.float32)}
        return {"params": params, "opt_state": self.tx.init(params)}

    def update(self, probe: dict[str, Any], variables: Any, batch: dict[str, jax.Array]
               ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        """One SGD step of the probe on the batch; ``(new probe state, {'probe_loss',
        'probe_top1'})`` with the loss and top-1 of the probe before the step."""
        feats = self.features(variables, batch)
        labels = batch["label"]
        valid = (labels >= 0).astype(jnp.float32)
        count = jnp.maximum(valid.sum(), 1.0)

        def loss_fn(params):
            logits = feats @ params["kernel"] + params["bias"]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
            return jnp.sum(ce * valid) / count, logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(probe["params"])
        updates, opt_state = self.tx.update(grads, probe["opt_state"], probe["params"])
        top1 = jnp.sum((jnp.argmax(logits, axis=-1) == labels) * valid) / count
        new = {"params": optax.apply_updates(probe["params"], updates), "opt_state": opt_state}
        return new, {"probe_loss": loss, "probe_top1": top1}


def create(config: ml_collections.ConfigDict, method: Any, total_steps: int
           ) -> OnlineProbe | None:
    """The run's probe, or None when ``online_probe.enabled`` is off (or the config has no
    ``online_probe`` block: see :func:`check_config`)."""
    enabled = "online_probe" in config and config.online_probe.enabled
    return OnlineProbe(config, method, total_steps) if enabled else None

r"""Colorization (Zhang, Isola, Efros 2016, "Colorful Image Colorization").

An image (one random crop, flipped at random) is converted to CIE Lab on the device
(:mod:`ssl_jax.data.color`). The encoder sees only the lightness, ``(L - 50) / 50`` as one
channel (:meth:`Colorization.encoder_input`: evaluation and fine-tuning feed it the same grey
input). A head (:class:`~ssl_jax.models.heads.UpsamplingDecoder` on the encoder's spatial map: a
ResNet's last stage or a ViT's patch tokens) predicts the ab channels at ``1 / target_stride``
of the input's side (the paper: 1/4), where the target is the average of ab over each
``target_stride``-square.

``loss='classification'`` (the paper's): ab space is quantised into the ``Q`` cells of side
``ab_grid`` (10) that 8-bit sRGB colours reach (:func:`ab_bins`: 261 at grid 10; the paper's
313 count a wider set whose derivation it does not give). A target ab is soft-encoded over its
``num_neighbours`` (5) nearest bin centres with Gaussian weights of ``sigma`` (5), normalised to
sum 1 (:func:`soft_encode`). The loss is the rebalanced multinomial cross-entropy, eq. (2)::

    L = - mean_{h,w} v(Z_hw) sum_q Z_hwq log softmax(logits_hw)_q,   v(Z_hw) = w_{q*},
    q* = argmax_q Z_hwq,   w ∝ ((1 - lambda) p~ + lambda / Q)^-1,   sum_q p~_q w_q = 1

with ``lambda = rebalance_lambda`` (0.5) and ``p~`` the empirical distribution of the targets'
nearest bins smoothed by a Gaussian of ``prior_sigma`` (5) ab units (:func:`smoothed_prior`:
the kernel over the bin centres, each bin's mass spread over the bins and renormalised). Where
the prior comes from: the paper counts it once over ImageNet's training set; here the counts
accumulate in the method's state (``extra['ab_counts']``) over the global batches of the first
``prior_steps`` steps (0: the whole run), this step's included, so that the weights are those of
the data seen so far and, past ``prior_steps``, fixed. Metrics: ``bin_accuracy`` (the argmax bin
is the nearest bin of the target) and ``ab_rmse`` of the annealed mean (T = ``annealed_t``,
0.38) in ab units.

``loss='regression'``: the head predicts ab / 100 with a mean squared error (the paper's L2
baseline; no prior, no rebalancing).

The evaluation job's picture (:meth:`Colorization.picture_panels`): the grey input | the
prediction (the input's L with the predicted ab, upsampled bilinearly) | the original.

Config keys: ``config.colorization.{loss, ab_grid, sigma, num_neighbours, rebalance_lambda,
prior_sigma, prior_steps, target_stride, head_dim, annealed_t}``; ``config.aug.view1`` is the
crop (no colour jitter: colour is the target).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from ssl_jax.config import ConfigError, require
from ssl_jax.data import augment, color, sources
from ssl_jax.methods.base import MethodBase
from ssl_jax.methods.ssl_math import feature_map, init_dense
from ssl_jax.models.heads import UpsamplingDecoder

LOSSES = ("classification", "regression")
AB_SCALE = 100.0  # regression targets: ab / 100


@functools.lru_cache(maxsize=8)
def ab_bins(grid: int) -> np.ndarray:
    """``[Q, 2]`` float32 centres ``(a, b)`` (multiples of ``grid``) of the ab cells that 8-bit
    sRGB colours reach: every colour of the lattice ``{0, 4, ..., 252, 255}^3`` (every 8-bit
    colour reaches the same cells at grid >= 5) converted to Lab and rounded to the nearest
    centre. Rows sorted by (a, b)."""
    levels = np.append(np.arange(0, 256, 4), 255) / 255.0
    rgb = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    ab = np.asarray(jax.jit(color.rgb_to_lab)(jnp.asarray(rgb, jnp.float32)))[:, 1:]
    cells = np.unique(np.round(ab / grid).astype(np.int64), axis=0)
    return (cells * grid).astype(np.float32)


def _squared_distances(ab: jax.Array, bins: jax.Array) -> jax.Array:
    """``[..., Q]`` squared distances of ``ab [..., 2]`` to the bin centres ``[Q, 2]``."""
    return jnp.sum(jnp.square(ab[..., None, :] - bins), axis=-1)


def soft_encode(ab: jax.Array, bins: jax.Array, sigma: float, k: int
                ) -> tuple[jax.Array, jax.Array]:
    """The soft encoding of ``ab [..., 2]``: ``(indices [..., k], weights [..., k])`` of its
    ``k`` nearest bins (nearest first) and ``exp(-d^2 / (2 sigma^2))`` normalised to sum 1."""
    neg, idx = jax.lax.top_k(-_squared_distances(ab, bins), k)
    weights = jax.nn.softmax(neg / (2.0 * sigma**2), axis=-1)  # = the normalised Gaussian
    return idx, weights


def smoothing_kernel(bins: jax.Array, sigma: float) -> jax.Array:
    """``[Q, Q]``: row ``r`` spreads bin ``r``'s mass over the bins by a Gaussian of ``sigma``
    (ab units) around its centre, renormalised to 1 (mass is kept)."""
    return jax.nn.softmax(-_squared_distances(bins, bins) / (2.0 * sigma**2), axis=-1)


def smoothed_prior(counts: jax.Array, kernel: jax.Array) -> jax.Array:
    """``p~ [Q]``: the empirical distribution ``counts / sum(counts)`` smoothed by ``kernel``;
    uniform (no rebalancing) when nothing has been counted."""
    total = jnp.sum(counts)
    smoothed = (counts / jnp.maximum(total, 1e-12)) @ kernel
    return jnp.where(total > 0, smoothed, 1.0 / counts.shape[0])


def rebalance_weights(prior: jax.Array, lam: float) -> jax.Array:
    """``w [Q]`` of eq. (4): ``((1 - lam) p~ + lam / Q)^-1`` normalised so that
    ``sum_q p~_q w_q = 1`` (weight 1 on expectation)."""
    w = 1.0 / ((1.0 - lam) * prior + lam / prior.shape[0])
    return w / jnp.sum(prior * w)


def annealed_mean(logits: jax.Array, bins: jax.Array, temperature: float) -> jax.Array:
    """``[..., 2]``: the mean ab of ``softmax(logits / T)`` (the annealed mean, Sec. 2.2)."""
    return jax.nn.softmax(logits / temperature, axis=-1) @ bins


def lightness_input(lab: jax.Array) -> jax.Array:
    """``[..., 3]`` Lab -> ``[..., 1]`` the encoder's input ``(L - 50) / 50``."""
    return (lab[..., :1] - 50.0) / 50.0


def downsample_ab(lab: jax.Array, stride: int) -> jax.Array:
    """``[b, s, s, 3]`` Lab -> ``[b, s / stride, s / stride, 2]``: ab averaged per square."""
    b, s = lab.shape[0], lab.shape[1]
    return lab[..., 1:].reshape(b, s // stride, stride, s // stride, stride, 2).mean(axis=(2, 4))


class Colorization(MethodBase):
    """Encoder on L, an upsampling head predicting ab (bins or regression)."""

    CONFIG_KEYS = ("loss", "ab_grid", "sigma", "num_neighbours", "rebalance_lambda",
                   "prior_sigma", "prior_steps", "target_stride", "head_dim", "annealed_t")

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None, **run_length: int):
        super().__init__(config, mesh, **run_length)
        _check_config(config)
        cfg = self.cfg
        self.view = config.aug.view1
        self.out_side = self.view.size // cfg.target_stride
        self.classify = cfg.loss == "classification"
        self.bins = jnp.asarray(ab_bins(cfg.ab_grid)) if self.classify else None
        out_dim = self.bins.shape[0] if self.classify else 2
        self.head = UpsamplingDecoder(out_dim=out_dim, size=self.out_side,
                                      hidden_dim=cfg.head_dim, dtype=self.encoder.dtype)

    def encoder_input(self, images: jax.Array) -> jax.Array:
        """Normalised RGB ``[b, h, w, 3]`` -> the lightness ``[b, h, w, 1]`` the encoder sees."""
        return lightness_input(color.rgb_to_lab(augment.denormalize(images)))

    def augment(self, rng, images, image_hw=None) -> jax.Array:
        """uint8 ``[b, h, w, 3]`` -> the Lab view ``[b, s, s, 3]`` of ``config.aug.view1``."""
        return color.rgb_to_lab(augment.augment_view(rng, images, self.view, image_hw))

    def predict(self, params, state, lightness, train: bool, rng=None):
        """``(head output [b, s', s', Q or 2], encoder state)`` for ``lightness [b, s, s, 1]``."""
        fmap, state = feature_map(self.encoder, params["encoder"], state, lightness,
                                  train=train, rng=rng)
        return self.head.apply({"params": params["head"]}, fmap), state

    def init(self, rng, batch):
        n = batch["image"].shape[0]
        x = jnp.zeros((n, self.view.size, self.view.size, 1), jnp.float32)
        params, state, head = init_dense(self.encoder, self.head, rng, x)
        extra = {"encoder": state}
        if self.classify:
            extra["ab_counts"] = jnp.zeros((self.bins.shape[0],), jnp.float32)
        return {"encoder": params, "head": head}, extra

    def loss(self, params, extra, batch, rng, step):
        k_aug, k_drop = jax.random.split(rng)
        lab = self.augment(k_aug, batch["image"], batch.get("image_hw"))
        target = downsample_ab(lab, self.cfg.target_stride)
        out, state = self.predict(params, extra["encoder"], lightness_input(lab), True, k_drop)
        if not self.classify:
            loss = jnp.mean(jnp.square(out - target / AB_SCALE))
            rmse = jnp.sqrt(jnp.mean(jnp.sum(jnp.square(out * AB_SCALE - target), axis=-1)))
            return loss, ({"ab_rmse": rmse}, {**extra, "encoder": state})
        loss, metrics, counts = self.classification_loss(out, target, extra["ab_counts"], step)
        return loss, (metrics, {**extra, "encoder": state, "ab_counts": counts})

    def classification_loss(self, logits, target_ab, counts, step):
        """Eq. (2) with the class rebalancing of the module docstring; ``(loss, metrics,
        updated counts)``. ``logits [b, s', s', Q]``, ``target_ab [b, s', s', 2]``."""
        cfg = self.cfg
        idx, z = soft_encode(target_ab, self.bins, cfg.sigma, cfg.num_neighbours)
        nearest = idx[..., 0]
        batch_counts = jnp.zeros_like(counts).at[nearest.reshape(-1)].add(1.0)
        counting = (cfg.prior_steps == 0) | (step < cfg.prior_steps)
        counts = counts + jnp.where(counting, batch_counts, 0.0)
        kernel = smoothing_kernel(self.bins, cfg.prior_sigma)
        weights = rebalance_weights(smoothed_prior(counts, kernel), cfg.rebalance_lambda)
        log_p = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.sum(z * jnp.take_along_axis(log_p, idx, axis=-1), axis=-1)
        loss = jnp.mean(jax.lax.stop_gradient(weights)[nearest] * ce)
        mean_ab = annealed_mean(logits, self.bins, cfg.annealed_t)
        metrics = {
            "bin_accuracy": jnp.mean(jnp.argmax(logits, axis=-1) == nearest),
            "ab_rmse": jnp.sqrt(jnp.mean(jnp.sum(jnp.square(mean_ab - target_ab), axis=-1))),
            "unweighted_ce": jnp.mean(ce),
        }
        return loss, metrics, jax.lax.stop_gradient(counts)

    def predicted_ab(self, params, extra, lightness) -> jax.Array:
        """``[b, s, s, 2]``: the predicted ab (annealed mean, or the regression) at the input's
        resolution (bilinear upsampling of the head's output)."""
        out, _ = self.predict(params, extra["encoder"], lightness, False)
        ab = (annealed_mean(out, self.bins, self.cfg.annealed_t) if self.classify
              else out * AB_SCALE)
        b, s = lightness.shape[:2]
        return jax.image.resize(ab, (b, s, s, 2), "bilinear")

    def picture_panels(self, params, extra, images, rng) -> dict[str, jax.Array]:
        """Columns of the evaluation job's picture, ``[b, s, s, 3]`` in [0, 1]: the grey input
        (L alone), the prediction (L with the predicted ab), the original."""
        del rng
        rgb = augment.denormalize(images)
        lab = color.rgb_to_lab(rgb)
        ab = self.predicted_ab(params, extra, lightness_input(lab))
        grey = jnp.concatenate([lab[..., :1], jnp.zeros_like(lab[..., 1:])], axis=-1)
        return {"grey": color.lab_to_rgb(grey),
                "prediction": color.lab_to_rgb(jnp.concatenate([lab[..., :1], ab], axis=-1)),
                "original": rgb}


METHOD = Colorization


def _check_config(config: ml_collections.ConfigDict) -> None:
    """Every key that could fail later, as a ConfigError naming it, before compiling; a
    single-channel (greyscale) source has no colour to predict and is refused."""
    cfg, size = config.colorization, config.aug.view1.size
    require(cfg.loss in LOSSES, "colorization.loss", f"{cfg.loss!r} is unknown; use one of "
            f"{LOSSES}")
    require(isinstance(cfg.ab_grid, int) and 5 <= cfg.ab_grid <= 50, "colorization.ab_grid",
            f"{cfg.ab_grid!r} must be an integer cell side in [5, 50] ab units (the paper: 10)")
    require(cfg.sigma > 0, "colorization.sigma", "must be > 0 (the paper: 5)")
    require(cfg.prior_sigma > 0, "colorization.prior_sigma", "must be > 0 (the paper: 5)")
    require(cfg.num_neighbours >= 1, "colorization.num_neighbours", "must be >= 1 (paper: 5)")
    require(0.0 <= cfg.rebalance_lambda <= 1.0, "colorization.rebalance_lambda",
            f"{cfg.rebalance_lambda} must lie in [0, 1] (the paper: 0.5)")
    require(cfg.prior_steps >= 0, "colorization.prior_steps", "must be >= 0 (0: the whole run)")
    require(cfg.annealed_t > 0, "colorization.annealed_t", "must be > 0 (the paper: 0.38)")
    require(cfg.head_dim >= 1, "colorization.head_dim", "must be >= 1")
    require(cfg.target_stride >= 1 and size % cfg.target_stride == 0,
            "colorization.target_stride", f"{cfg.target_stride} must divide the crop side "
            f"aug.view1.size={size} (the ab target is averaged over stride-squares)")
    if cfg.loss == "classification":
        require(cfg.num_neighbours <= len(ab_bins(cfg.ab_grid)), "colorization.num_neighbours",
                f"{cfg.num_neighbours} exceeds the {len(ab_bins(cfg.ab_grid))} ab bins")
    channels = sources.source_channels(config.data)
    if channels == 1:
        raise ConfigError(
            f"config.data.name={config.data.name!r} is a single-channel (greyscale) source: "
            "colorization has no colour to predict; train it on colour images "
            "(data=cifar10, data=imagenet2012 or --config.data.root=FOLDER of colour images)")

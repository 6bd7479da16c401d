r"""Discrete VAE (Ramesh et al. 2021, DALL-E's stage 1): the visual tokenizer of BEiT.

An image (a random resized crop, flipped at random: ``config.aug.view1``) is normalised and
encoded into logits ``l [b, g, g, V]`` of q(z | x) over ``V`` visual tokens per grid cell
(:class:`ssl_jax.models.dvae.DiscreteVAE`). Training replaces the categorical sample by the
Gumbel-softmax relaxation (Jang et al. 2017; Maddison et al. 2017)::

    y = softmax((l + G) / tau),    G_k = -log(-log U_k),  U_k ~ U(0, 1)

(``straight_through``: the forward pass uses ``one_hot(argmax y)``, the gradient is that of
``y``), decodes ``y`` and minimises::

    L = MSE(decode(y), x) + beta(t) * mean_cells KL(q(z | x) || U(V)),
    KL(q || U) = sum_k q_k log q_k + log V

Reconstruction loss: the mean squared error on the normalised image (ImageNet statistics), i.e.
a Gaussian likelihood of fixed variance. DALL-E uses a logit-Laplace likelihood for its 256-px
pixels in (eps, 1 - eps); here the tokenizer only has to give BEiT targets that carry the
image's content at 16-112 px, MSE is the loss the rest of the project (MAE) reconstructs with,
it has no extra output channels or eps to tune, and it reads directly as a reconstruction
error in the evaluation.

Schedules (``t`` = step, ``T`` = total steps of the run), both cosine as DALL-E anneals them:

    tau(t)  = tau_end + (tau_start - tau_end) * (1 + cos(pi * min(t / T_tau, 1))) / 2,
              T_tau = temperature_anneal_fraction * T   (1 -> 1/16, DALL-E)
    beta(t) = kl_weight * (1 - cos(pi * min(t / T_beta, 1))) / 2,
              T_beta = kl_warmup_fraction * T           (0 -> kl_weight)

A schedule with a horizon of 0 steps (fraction 0, or a job that does not know the run's length)
is at its final value from step 0.

Metrics of every step (over the global batch): ``recon_mse``, ``kl``, ``temperature``,
``kl_weight``, ``perplexity`` = ``exp(H(mean over examples and cells of q(z | x)))``,
``unused_tokens`` (tokens that are the argmax of no cell of the batch) and ``hard_recon_mse``
(the decoder on the one-hot argmax codes, not trained through; about 13% of a digits step on
CPU, kept because the hard codes are what BEiT gets).

The tokenizer's use (BEiT): :meth:`DVAE.token_ids` is the argmax of q(z | x), no sampling.
Config keys: ``config.dvae.{vocab_size, hidden_dim, codebook_dim, num_downsample,
num_res_blocks, dtype, temperature_start, temperature_end, temperature_anneal_fraction,
kl_weight, kl_warmup_fraction, straight_through}``; ``config.aug.view1`` is the crop.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from ssl_jax.config import require
from ssl_jax.data import augment
from ssl_jax.methods.base import MethodBase
from ssl_jax.methods.ssl_math import cosine_anneal
from ssl_jax.models.dvae import DiscreteVAE, DVAEEncoder

# --- The maths, as small pure functions ------------------------------------------------------


def gumbel_softmax(rng: jax.Array, logits: jax.Array, temperature: jax.Array | float,
                   hard: bool = False) -> jax.Array:
    """A relaxed one-hot sample ``softmax((logits + G) / temperature)`` over the last axis,
    ``G`` i.i.d. standard Gumbel; same shape as ``logits`` (float32).

    ``hard``: straight-through; the value is ``one_hot(argmax)`` exactly, the gradient that of
    the soft sample (``hard + (soft - stop_gradient(soft))``)."""
    logits = logits.astype(jnp.float32)
    noise = jax.random.gumbel(rng, logits.shape, jnp.float32)
    soft = jax.nn.softmax((logits + noise) / temperature, axis=-1)
    if not hard:
        return soft
    one_hot = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
    return one_hot + (soft - jax.lax.stop_gradient(soft))


def kl_to_uniform(logits: jax.Array) -> jax.Array:
    """``mean over cells of KL(softmax(logits) || uniform)`` in nats, for ``[..., V]`` logits:
    ``sum_k q_k log q_k + log V`` per cell, averaged over all leading axes."""
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    per_cell = jnp.sum(jnp.exp(log_q) * log_q, axis=-1) + math.log(logits.shape[-1])
    return jnp.mean(per_cell)


def code_usage(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(perplexity, unused)`` of the code distribution over a whole batch of ``[..., V]``
    logits: ``exp(H(mean_cells softmax(logits)))`` (V when every token is equally used, 1 when
    one token takes everything) and the number of tokens that are the argmax of no cell."""
    vocab = logits.shape[-1]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(-1, vocab)
    mean = jnp.mean(probs, axis=0)
    perplexity = jnp.exp(-jnp.sum(mean * jnp.log(jnp.maximum(mean, 1e-12))))
    hits = jnp.zeros((vocab,), jnp.int32).at[jnp.argmax(probs, axis=-1)].add(1)
    return perplexity, jnp.sum(hits == 0).astype(jnp.float32)


def dvae_loss(recon: jax.Array, images: jax.Array, logits: jax.Array, kl_weight: jax.Array
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``MSE(recon, images) + kl_weight * kl_to_uniform(logits)`` with both terms as metrics.

    ``recon, images [b, s, s, 3]`` (normalised), ``logits [b, g, g, V]``."""
    chex.assert_equal_shape([recon, images])
    mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - images))
    kl = kl_to_uniform(logits)
    return mse + kl_weight * kl, {"recon_mse": mse, "kl": kl}


# --- The method ------------------------------------------------------------------------------


class DVAE(MethodBase):
    """A DALL-E-like discrete VAE trained with the Gumbel-softmax relaxation.

    Public attributes used by BEiT: :attr:`model` (the :class:`DiscreteVAE`), :attr:`image_size`
    (tokenizer input side in px), :attr:`grid` (tokens per side), :attr:`vocab_size`, and
    :meth:`token_ids`. Parameters: ``{'dvae': DiscreteVAE params}``; no extra state."""

    CONFIG_KEYS = ("vocab_size", "hidden_dim", "codebook_dim", "num_downsample", "num_res_blocks",
                   "dtype", "temperature_start", "temperature_end",
                   "temperature_anneal_fraction", "kl_weight", "kl_warmup_fraction",
                   "straight_through")

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None, **run_length: int):
        _check_config(config)
        super().__init__(config, mesh, **run_length)
        cfg = self.cfg
        self.view = config.aug.view1
        self.image_size: int = self.view.size
        self.grid: int = self.image_size // 2**cfg.num_downsample
        self.vocab_size: int = cfg.vocab_size
        dtype = jnp.dtype(cfg.dtype)
        self.model = DiscreteVAE(cfg.vocab_size, cfg.hidden_dim, cfg.codebook_dim,
                                 cfg.num_downsample, cfg.num_res_blocks, dtype)
        self.temperature_steps = int(round(cfg.temperature_anneal_fraction * self.total_steps))
        self.kl_warmup_steps = int(round(cfg.kl_warmup_fraction * self.total_steps))

    def make_encoder(self) -> DVAEEncoder:
        """The dVAE's encoder half (its logits are the features evaluation probes)."""
        cfg = self.cfg
        return DVAEEncoder(cfg.vocab_size, cfg.hidden_dim, cfg.num_downsample,
                           cfg.num_res_blocks, jnp.dtype(cfg.dtype))

    # --- Schedules ------------------------------------------------------------------------------
    def temperature_schedule(self, step: jax.Array | int) -> jax.Array:
        """Gumbel-softmax temperature at ``step``: cosine from ``temperature_start`` to
        ``temperature_end`` over ``temperature_anneal_fraction`` of the run, then constant."""
        cfg = self.cfg
        return cosine_anneal(step, cfg.temperature_start, cfg.temperature_end,
                             self.temperature_steps)

    def kl_weight_schedule(self, step: jax.Array | int) -> jax.Array:
        """KL weight at ``step``: cosine from 0 to ``kl_weight`` over ``kl_warmup_fraction`` of
        the run, then constant."""
        return cosine_anneal(step, 0.0, self.cfg.kl_weight, self.kl_warmup_steps)

    # --- The tokenizer --------------------------------------------------------------------------
    def logits(self, params: Any, images: jax.Array) -> jax.Array:
        """Normalised ``images [b, image_size, image_size, 3]`` -> ``[b, grid, grid, V]``."""
        return self.model.apply({"params": params["dvae"]}, images, method="logits")

    def token_ids(self, params: Any, images: jax.Array) -> jax.Array:
        """Visual tokens of normalised ``images [b, image_size, image_size, 3]`` (from
        ``augment.normalize``): int32 ``[b, grid * grid]``, the argmax of q(z | x), row-major
        over the grid. ``params``: the whole ``{'dvae': ...}``. Deterministic and jittable."""
        chex.assert_shape(images, (None, self.image_size, self.image_size, 3))
        logits = self.logits(params, images)
        return jnp.argmax(logits, axis=-1).reshape(images.shape[0], -1).astype(jnp.int32)

    def decode_tokens(self, params: Any, ids: jax.Array) -> jax.Array:
        """Token ids ``[b, grid * grid]`` -> normalised images ``[b, image_size, image_size, 3]``
        (the decoder on one-hot codes)."""
        codes = jax.nn.one_hot(ids.reshape(-1, self.grid, self.grid), self.vocab_size)
        return self.model.apply({"params": params["dvae"]}, codes, method="decode")

    # --- The Method interface ---------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        n = batch["image"].shape[0]
        x = jnp.zeros((n, self.image_size, self.image_size, 3), jnp.float32)  # shapes only
        return {"dvae": self.model.init(rng, x)["params"]}, {}

    def loss(self, params, extra, batch, rng, step):
        k_aug, k_gumbel = jax.random.split(rng)
        images = self.augment(k_aug, batch["image"], batch.get("image_hw"))
        logits = self.logits(params, images)
        temperature = self.temperature_schedule(step)
        kl_weight = self.kl_weight_schedule(step)
        codes = gumbel_softmax(k_gumbel, logits, temperature, self.cfg.straight_through)
        recon = self.model.apply({"params": params["dvae"]}, codes, method="decode")
        loss, metrics = dvae_loss(recon, images, logits, kl_weight)
        perplexity, unused = code_usage(logits)
        hard = jax.lax.stop_gradient(self.model.apply(
            {"params": params["dvae"]}, jax.nn.one_hot(jnp.argmax(logits, -1), self.vocab_size),
            method="decode"))
        metrics.update(temperature=temperature, kl_weight=kl_weight, perplexity=perplexity,
                       unused_tokens=unused,
                       hard_recon_mse=jnp.mean(jnp.square(hard - images)))
        return loss, (metrics, extra)

    def encoder_variables(self, params, extra) -> dict[str, Any]:
        return {"params": params["dvae"]["encoder"]}

    def picture_panels(self, params, extra, images: jax.Array, rng: jax.Array
                       ) -> dict[str, jax.Array]:
        """The evaluation picture's columns, ``[b, s, s, 3]`` in [0, 1]: the image and its
        reconstruction from the hard (argmax) tokens, as BEiT sees them."""
        del extra, rng
        recon = self.decode_tokens(params, self.token_ids(params, images))
        return {"original": augment.denormalize(images),
                "reconstruction": augment.denormalize(recon)}


METHOD = DVAE


def _check_config(config: ml_collections.ConfigDict) -> None:
    """Every dVAE key that could fail later, as a ConfigError naming it, before compile."""
    cfg = config.dvae
    for key in ("vocab_size", "hidden_dim", "codebook_dim", "num_res_blocks"):
        minimum = 2 if key == "vocab_size" else 1
        require(isinstance(cfg[key], int) and cfg[key] >= minimum, f"dvae.{key}",
                f"{cfg[key]!r} must be an integer >= {minimum}")
    require(isinstance(cfg.num_downsample, int) and 1 <= cfg.num_downsample <= 6,
            "dvae.num_downsample", f"{cfg.num_downsample!r} must be an integer in [1, 6] "
            "(the grid is image size / 2**num_downsample)")
    size, factor = config.aug.view1.size, 2**cfg.num_downsample
    require(size % factor == 0, "aug.view1.size",
            f"image size {size} px is not divisible by 2**dvae.num_downsample = {factor}; use "
            f"a multiple of {factor} or change dvae.num_downsample")
    try:
        jnp.dtype(cfg.dtype)
    except TypeError:
        require(False, "dvae.dtype", f"{cfg.dtype!r} is not a dtype; use 'float32' or 'bfloat16'")
    require(0.0 < cfg.temperature_start, "dvae.temperature_start",
            f"{cfg.temperature_start} must be > 0 (DALL-E: 1.0)")
    require(0.0 < cfg.temperature_end <= cfg.temperature_start, "dvae.temperature_end",
            f"{cfg.temperature_end} must be in (0, temperature_start={cfg.temperature_start}] "
            "(DALL-E: 1/16)")
    for key in ("temperature_anneal_fraction", "kl_warmup_fraction"):
        require(0.0 <= cfg[key] <= 1.0, f"dvae.{key}",
                f"{cfg[key]} must be a share of the run in [0, 1]")
    require(cfg.kl_weight >= 0.0, "dvae.kl_weight", f"{cfg.kl_weight} must be >= 0")
    require(isinstance(cfg.straight_through, bool), "dvae.straight_through",
            "must be true or false")
